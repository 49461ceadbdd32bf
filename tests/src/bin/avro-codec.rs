//! Benchmark: Avro records read and written straight from and into the record types (the
//! codec's way) next to the generic `Value` in between (the registry client's way), in the
//! same run, on billing's `InvoiceIssued`; then through the codec itself against the dev
//! stack's registry (its schema caches included).
//!
//!     cargo run --release -p forfall-e2e --bin avro-codec -- 200000

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use forfall_e2e::*;
use forfall_platform::clock::SystemClock;
use forfall_platform::records::{InvoiceIssued, Record};

/// Records per second of `n` calls of `f`.
fn rate(n: usize, mut f: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let started = Instant::now();
    for i in 0..n {
        f(i)?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn row(what: &str, rate: f64, baseline: f64) {
    println!(
        "{what:<52} {rate:>10.0} records/s  {:>5.2}× the generic Value",
        rate / baseline
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = bench_arg(1, 200_000.0)? as usize;
    let mut record = danish("inv-1", "1000001", day(2026, 3, 15), "x@example.test").issued();
    record.description = Some("Electricity, March 2026, meter 571313104402345678".into());
    let schema = Schema::parse_str(InvoiceIssued::AVSC)?;
    let writer = GenericDatumWriter::builder(&schema).build()?;
    let reader = GenericDatumReader::builder(&schema).build()?;
    let body = writer.write_ser_to_vec(&record)?;
    println!("{n} InvoiceIssued records of {} bytes each", body.len());

    // Both ways each round: on a shared machine a neighbour's burst then hits both alike.
    let generic_write = rate(n, |_| {
        let value = apache_avro::to_value(black_box(&record))?;
        black_box(writer.write_value_to_vec(value)?);
        Ok(())
    })?;
    let straight_write = rate(n, |_| {
        black_box(writer.write_ser_to_vec(black_box(&record))?);
        Ok(())
    })?;
    let generic_read = rate(n, |_| {
        let value = reader.read_value(&mut black_box(&body[..]))?;
        black_box(apache_avro::from_value::<InvoiceIssued>(&value)?);
        Ok(())
    })?;
    let straight_read = rate(n, |_| {
        black_box(reader.read_deser::<InvoiceIssued>(&mut black_box(&body[..]))?);
        Ok(())
    })?;
    row(
        "write, generic Value (to_value, validate, encode)",
        generic_write,
        generic_write,
    );
    row(
        "write, straight from the type (write_ser)",
        straight_write,
        generic_write,
    );
    row("read, generic Value (decode, from_value)", generic_read, generic_read);
    row("read, straight into the type (read_deser)", straight_read, generic_read);

    // Through the codec: its registry lookups are cached after the first record.
    let mut config = base_config();
    config.log.level = "warn".into();
    let stack = LocalStack::start(config, Arc::new(SystemClock)).await?;
    let topic = stack.topic(&stack.topics().billing_invoice_events);
    let codec = &stack.rt.codec;
    let payload = codec.encode(&topic, &record).await?;
    let started = Instant::now();
    for _ in 0..n {
        black_box(codec.encode(&topic, black_box(&record)).await?);
    }
    let codec_write = n as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..n {
        black_box(
            codec
                .decode(Some(black_box(&payload[..])))
                .await?
                .to::<InvoiceIssued>()?,
        );
    }
    let codec_read = n as f64 / started.elapsed().as_secs_f64();
    row("codec.encode (registry-cached)", codec_write, generic_write);
    row("codec.decode + to (registry-cached)", codec_read, generic_read);
    stack.shutdown().await;
    Ok(())
}

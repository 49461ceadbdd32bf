//! Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro body),
//! through `schema_registry_converter` against any Confluent-compatible registry.
//!
//! Subjects follow the TopicRecordNameStrategy (`<topic>-<record full name>`), so that a
//! topic may carry several record types (billing's issued/credited/cancelled) and each type
//! evolves under the registry's compatibility rules.
//!
//! The registry client finds (and registers) schemas; datums are read and written straight
//! from and into the record types with the schema the registry holds for their id, without
//! the generic `Value` in between, which costs an allocation per field name and value (the
//! `avro-codec` benchmark measures both ways; see docs/benchmarks.md).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};

use crate::records::Record;

/// The registry client could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(String);

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The registry could not be reached; worth retrying.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    #[error("cannot encode {record} for topic '{topic}': {detail}")]
    Refused {
        record: &'static str,
        topic: String,
        detail: String,
    },
}

impl EncodeError {
    pub fn is_transient(&self) -> bool {
        matches!(self, EncodeError::Unavailable(_))
    }
}

/// Why a payload could not be decoded. Each permanent variant maps to a rejection reason code.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value")]
    Empty,
    #[error("not Confluent Avro: {0}")]
    NotConfluentAvro(String),
    #[error("schema id {id} is not known to the schema registry: {detail}")]
    UnknownSchemaId { id: u32, detail: String },
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    #[error("Avro body does not match schema id {id}: {detail}")]
    Undecodable { id: u32, detail: String },
    #[error("unexpected record type {found}; this topic carries {expected}")]
    UnexpectedType { expected: String, found: String },
    #[error("record {record} does not fit the service's model: {detail}")]
    Mismatch { record: String, detail: String },
}

impl DecodeError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DecodeError::Unavailable(_))
    }

    pub fn reason_code(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty_value",
            DecodeError::NotConfluentAvro(_) => "not_avro",
            DecodeError::UnknownSchemaId { .. } => "unknown_schema_id",
            DecodeError::Unavailable(_) => "registry_unavailable",
            DecodeError::Undecodable { .. } => "undecodable",
            DecodeError::UnexpectedType { .. } => "unexpected_record_type",
            DecodeError::Mismatch { .. } => "undecodable",
        }
    }
}

/// The HTTP status a registry call failed with, when it got that far.
fn http_status(e: &SRCError) -> Option<u16> {
    let at = e.error.find("status ")? + "status ".len();
    e.error[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Whether a registry failure says something about the request itself (the schema id is not
/// known, the schema is refused or unreadable) rather than about the registry being away. The
/// converter calls only network errors, 502 and 503 retriable; a 500, 504, 429 or an
/// authorisation problem also pass, and must be waited out rather than turned into a
/// rejection of a valid record.
fn is_definitive(e: &SRCError, definitive: &[u16]) -> bool {
    !e.retriable && http_status(e).is_none_or(|status| definitive.contains(&status))
}

fn describe(e: &SRCError) -> String {
    match &e.cause {
        Some(cause) => format!("{}: {cause}", e.error),
        None => e.error.clone(),
    }
}

/// A registered schema, ready to read and write datums of it.
struct Prepared {
    id: u32,
    name: String,
    reader: GenericDatumReader<'static>,
    writer: GenericDatumWriter<'static>,
}

impl Prepared {
    fn new(id: u32, schema: Schema) -> Result<Self, apache_avro::Error> {
        // The reader and writer borrow the schema and the names resolved in it, and are kept
        // for the life of the process like the registry client's own cache: one schema per id
        // the process meets, never released.
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let name = match schema {
            Schema::Record(record) => record.name.fullname(None),
            other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)),
        };
        Ok(Self {
            id,
            name,
            reader: GenericDatumReader::builder(schema).build()?,
            writer: GenericDatumWriter::builder(schema).build()?,
        })
    }
}

/// A record whose schema is known: its full Avro name, read into a type on demand.
#[derive(Clone)]
pub struct Decoded {
    pub name: String,
    schema: Arc<Prepared>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoded")
            .field("name", &self.name)
            .field("schema_id", &self.schema.id)
            .field("bytes", &self.body.len())
            .finish()
    }
}

impl Decoded {
    /// The typed record; refuses a record of another type, or a body that does not read as
    /// its schema says.
    pub fn to<T: Record>(&self) -> Result<T, DecodeError> {
        if self.name != T::FULL_NAME {
            return Err(DecodeError::UnexpectedType {
                expected: T::FULL_NAME.to_owned(),
                found: self.name.clone(),
            });
        }
        let mut body = self.body.as_slice();
        let value = self
            .schema
            .reader
            .read_deser::<T>(&mut body)
            .map_err(|e| DecodeError::Undecodable {
                id: self.schema.id,
                detail: e.to_string(),
            })?;
        if !body.is_empty() {
            return Err(DecodeError::Undecodable {
                id: self.schema.id,
                detail: format!("{} bytes left after the record", body.len()),
            });
        }
        Ok(value)
    }
}

/// Schemas met so far, by id, and the id each (topic, record type) is written with.
#[derive(Default)]
struct Prepareds {
    by_id: RwLock<HashMap<u32, Arc<Prepared>>>,
    by_topic: RwLock<HashMap<String, HashMap<&'static str, Arc<Prepared>>>>,
}

impl Prepareds {
    fn by_id(&self, id: u32) -> Option<Arc<Prepared>> {
        self.by_id.read().ok()?.get(&id).cloned()
    }

    fn for_topic<T: Record>(&self, topic: &str) -> Option<Arc<Prepared>> {
        self.by_topic.read().ok()?.get(topic)?.get(T::FULL_NAME).cloned()
    }

    fn keep(&self, prepared: Arc<Prepared>) {
        if let Ok(mut by_id) = self.by_id.write() {
            by_id.entry(prepared.id).or_insert(prepared);
        }
    }

    fn keep_for_topic<T: Record>(&self, topic: &str, prepared: Arc<Prepared>) {
        if let Ok(mut by_topic) = self.by_topic.write() {
            by_topic
                .entry(topic.to_owned())
                .or_default()
                .insert(T::FULL_NAME, prepared);
        }
    }
}

/// Encoder + decoder sharing one registry client configuration; cheap to share behind an `Arc`.
pub struct Codec {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    auto_register: bool,
    prepared: Prepareds,
}

impl Codec {
    pub fn new(registry_url: &str, auto_register: bool) -> Self {
        let settings = SrSettings::new(registry_url.trim_end_matches('/').to_owned());
        Self::with_settings(settings, auto_register)
    }

    /// For `registry`'s URL, with its basic authentication when a username is set.
    pub fn for_registry(registry: &crate::config::RegistryConfig) -> Result<Self, CodecError> {
        let url = registry.url.trim_end_matches('/').to_owned();
        let settings = match &registry.username {
            None => SrSettings::new(url),
            Some(username) => SrSettings::new_builder(url)
                .set_basic_authorization(username, registry.password.as_ref().map(|p| p.expose()))
                .build()
                .map_err(|e| CodecError(format!("schema registry client: {e}")))?,
        };
        Ok(Self::with_settings(settings, registry.auto_register))
    }

    fn with_settings(settings: SrSettings, auto_register: bool) -> Self {
        Self {
            encoder: AvroEncoder::new(settings.clone()),
            decoder: AvroDecoder::new(settings),
            auto_register,
            prepared: Prepareds::default(),
        }
    }

    fn strategy<T: Record>(&self, topic: &str) -> SubjectNameStrategy {
        if self.auto_register {
            let schema = SuppliedSchema::new(Some(T::FULL_NAME.to_owned()), SchemaType::Avro, T::AVSC.to_owned());
            SubjectNameStrategy::TopicRecordNameStrategyWithSchema(topic.to_owned(), schema)
        } else {
            SubjectNameStrategy::TopicRecordNameStrategy(topic.to_owned(), T::FULL_NAME.to_owned())
        }
    }

    pub async fn encode<T: Record>(&self, topic: &str, value: &T) -> Result<Vec<u8>, EncodeError> {
        if let Some(prepared) = self.prepared.for_topic::<T>(topic) {
            return write(&prepared, topic, value);
        }
        // The first record of its type for this topic goes through the registry client, which
        // registers the schema (auto-registration) or finds the registered one; its bytes name
        // the schema's id, whose schema writes the records after it.
        let bytes = self.encode_through_registry(topic, value).await?;
        if let Some(id) = schema_id(&bytes) {
            match self.prepared_by_id(id).await {
                Ok(prepared) => self.prepared.keep_for_topic::<T>(topic, prepared),
                Err(e) => {
                    tracing::warn!(error = %e, id, "schema not kept; records are written through the registry client")
                }
            }
        }
        Ok(bytes)
    }

    async fn encode_through_registry<T: Record>(&self, topic: &str, value: &T) -> Result<Vec<u8>, EncodeError> {
        let strategy = self.strategy::<T>(topic);
        self.encoder.encode_struct(value, &strategy).await.map_err(|e| {
            // 404: the subject or version does not exist (auto-registration off); 409: the
            // schema is incompatible; 422: the schema is invalid.
            if !is_definitive(&e, &[404, 409, 422]) {
                // Errors are cached by the converter; a transient one must not stick.
                self.encoder.remove_errors_from_cache();
                EncodeError::Unavailable(describe(&e))
            } else {
                EncodeError::Refused {
                    record: T::FULL_NAME,
                    topic: topic.to_owned(),
                    detail: describe(&e),
                }
            }
        })
    }

    /// The schema of `id`, ready to read and write, from the registry the first time.
    async fn prepared_by_id(&self, id: u32) -> Result<Arc<Prepared>, DecodeError> {
        if let Some(prepared) = self.prepared.by_id(id) {
            return Ok(prepared);
        }
        let registered = match self.decoder.get_schema(id).await {
            Ok(registered) => registered,
            // Only the registry's "not found" says the id is unknown; anything else (500, 504,
            // a timeout, a refused connection) is the registry being away.
            Err(e) if !is_definitive(&e, &[404]) => {
                self.decoder.remove_errors_from_cache();
                return Err(DecodeError::Unavailable(describe(&e)));
            }
            Err(e) => {
                return Err(DecodeError::UnknownSchemaId {
                    id,
                    detail: describe(&e),
                });
            }
        };
        let prepared = Prepared::new(id, registered.parsed.clone()).map_err(|e| DecodeError::UnknownSchemaId {
            id,
            detail: format!("the registry's schema cannot be used: {e}"),
        })?;
        let prepared = Arc::new(prepared);
        self.prepared.keep(prepared.clone());
        Ok(prepared)
    }

    /// A record encoded for `topic`, keyed by `key`, continuing `trace` (the span that made it:
    /// the next service's span is its child).
    pub async fn outbound<T: Record>(
        &self,
        topic: &str,
        key: &str,
        value: &T,
        trace: crate::telemetry::TraceContext,
    ) -> Result<crate::kafka::Outbound, EncodeError> {
        let payload = self.encode(topic, value).await?;
        Ok(crate::kafka::Outbound {
            topic: topic.to_owned(),
            key: key.to_owned(),
            payload,
            trace,
            partition: None,
        })
    }

    /// The record's schema, found from its id; the body is read by [`Decoded::to`].
    pub async fn decode(&self, payload: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        let bytes = payload.ok_or(DecodeError::Empty)?;
        let Some(id) = schema_id(bytes) else {
            return Err(DecodeError::NotConfluentAvro(format!(
                "{} bytes, first byte {:#04x}; expected magic byte 0x00 and a 4-byte schema id",
                bytes.len(),
                bytes.first().copied().unwrap_or(0)
            )));
        };
        let schema = self.prepared_by_id(id).await?;
        Ok(Decoded {
            name: schema.name.clone(),
            schema,
            body: bytes[5..].to_vec(),
        })
    }
}

/// The schema id of a record in the Confluent wire format.
fn schema_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// `value` in the wire format of `prepared`'s schema.
fn write<T: Record>(prepared: &Prepared, topic: &str, value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut bytes = Vec::with_capacity(256);
    bytes.push(0);
    bytes.extend_from_slice(&prepared.id.to_be_bytes());
    prepared
        .writer
        .write_ser(&mut bytes, value)
        .map_err(|e| EncodeError::Refused {
            record: T::FULL_NAME,
            topic: topic.to_owned(),
            detail: e.to_string(),
        })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http_error(status: &str, retriable: bool) -> SRCError {
        SRCError::new(
            &format!("HTTP request to schema registry failed with status {status}"),
            None,
            retriable,
        )
    }

    #[test]
    fn only_not_found_makes_a_schema_id_unknown() {
        assert!(is_definitive(&http_error("404 Not Found", false), &[404]));
        for status in [
            "500 Internal Server Error",
            "504 Gateway Timeout",
            "429 Too Many Requests",
            "401 Unauthorized",
        ] {
            assert!(
                !is_definitive(&http_error(status, false), &[404]),
                "{status} is the registry being away"
            );
        }
        assert!(!is_definitive(&http_error("503 Service Unavailable", true), &[404]));
        assert!(
            is_definitive(&SRCError::new("Could not parse schema", None, false), &[404]),
            "an unreadable schema is not waited out"
        );
    }

    #[test]
    fn an_incompatible_schema_is_refused_and_an_outage_is_waited_out() {
        assert!(is_definitive(&http_error("409 Conflict", false), &[404, 409, 422]));
        assert!(!is_definitive(
            &http_error("500 Internal Server Error", false),
            &[404, 409, 422]
        ));
    }

    fn issued() -> crate::records::InvoiceCancelled {
        crate::records::InvoiceCancelled {
            event_id: "e".into(),
            tenant: "t".into(),
            debtor_id: "t:d".into(),
            occurred_at: 1,
            invoice_id: "i".into(),
            reason: Some("duplicate".into()),
        }
    }

    fn decoded(body: Vec<u8>) -> Decoded {
        use crate::records::InvoiceCancelled;
        let schema = Schema::parse_str(InvoiceCancelled::AVSC).unwrap();
        let prepared = Arc::new(Prepared::new(7, schema).unwrap());
        Decoded {
            name: prepared.name.clone(),
            schema: prepared,
            body,
        }
    }

    #[test]
    fn a_record_reads_back_and_a_cut_or_padded_body_is_undecodable() {
        use crate::records::{InvoiceCancelled, InvoiceIssued};
        let schema = Schema::parse_str(InvoiceCancelled::AVSC).unwrap();
        let bytes = write(&Prepared::new(7, schema).unwrap(), "t", &issued()).unwrap();
        assert_eq!(schema_id(&bytes), Some(7));
        let body = bytes[5..].to_vec();
        assert_eq!(decoded(body.clone()).name, InvoiceCancelled::FULL_NAME);
        assert_eq!(decoded(body.clone()).to::<InvoiceCancelled>().unwrap(), issued());

        let cut = decoded(body[..body.len() - 3].to_vec()).to::<InvoiceCancelled>();
        assert!(matches!(cut, Err(DecodeError::Undecodable { id: 7, .. })), "{cut:?}");
        let mut padded = body.clone();
        padded.push(0);
        let padded = decoded(padded).to::<InvoiceCancelled>();
        assert!(
            matches!(&padded, Err(DecodeError::Undecodable { id: 7, detail }) if detail.contains("1 bytes left")),
            "{padded:?}"
        );
        let other = decoded(body).to::<InvoiceIssued>();
        assert!(matches!(other, Err(DecodeError::UnexpectedType { .. })), "{other:?}");
    }

    #[test]
    fn only_the_confluent_wire_format_names_a_schema() {
        assert_eq!(schema_id(&[0, 0, 0, 1, 2, 9]), Some(258));
        assert_eq!(schema_id(&[0, 0, 0, 1]), None);
        assert_eq!(schema_id(&[1, 0, 0, 0, 2]), None);
    }
}

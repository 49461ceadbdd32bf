//! Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro body),
//! through `schema_registry_converter` against any Confluent-compatible registry.
//!
//! Subjects follow the TopicRecordNameStrategy (`<topic>-<record full name>`), so that a
//! topic may carry several record types (billing's issued/credited/cancelled) and each type
//! evolves under the registry's compatibility rules.

use apache_avro::types::Value;
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

/// A decoded record: its full Avro name and generic value.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub name: String,
    pub value: Value,
}

impl Decoded {
    /// The typed record; refuses a record of another type.
    pub fn to<T: Record>(&self) -> Result<T, DecodeError> {
        if self.name != T::FULL_NAME {
            return Err(DecodeError::UnexpectedType {
                expected: T::FULL_NAME.to_owned(),
                found: self.name.clone(),
            });
        }
        apache_avro::from_value(&self.value).map_err(|e| DecodeError::Mismatch {
            record: self.name.clone(),
            detail: e.to_string(),
        })
    }
}

/// Encoder + decoder sharing one registry client configuration; cheap to share behind an `Arc`.
pub struct Codec {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    auto_register: bool,
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

    pub async fn decode(&self, payload: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        let bytes = payload.ok_or(DecodeError::Empty)?;
        if bytes.len() < 5 || bytes[0] != 0 {
            return Err(DecodeError::NotConfluentAvro(format!(
                "{} bytes, first byte {:#04x}; expected magic byte 0x00 and a 4-byte schema id",
                bytes.len(),
                bytes.first().copied().unwrap_or(0)
            )));
        }
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        if let Err(e) = self.decoder.get_schema(id).await {
            // Only the registry's "not found" says the id is unknown; anything else (500, 504,
            // a timeout, a refused connection) is the registry being away.
            if !is_definitive(&e, &[404]) {
                self.decoder.remove_errors_from_cache();
                return Err(DecodeError::Unavailable(describe(&e)));
            }
            return Err(DecodeError::UnknownSchemaId {
                id,
                detail: describe(&e),
            });
        }
        let decoded = self
            .decoder
            .decode(Some(bytes))
            .await
            .map_err(|e| DecodeError::Undecodable {
                id,
                detail: describe(&e),
            })?;
        let name = decoded.name.map(|n| n.fullname(None)).unwrap_or_default();
        Ok(Decoded {
            name,
            value: decoded.value,
        })
    }
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
}

//! DEV AND TEST ONLY: an in-memory emulator of the Confluent Schema Registry REST API subset
//! Forfall uses (see README.md). Production uses a real Confluent-compatible registry.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        Some(match s {
            "NONE" => Level::None,
            "BACKWARD" => Level::Backward,
            "BACKWARD_TRANSITIVE" => Level::BackwardTransitive,
            "FORWARD" => Level::Forward,
            "FORWARD_TRANSITIVE" => Level::ForwardTransitive,
            "FULL" => Level::Full,
            "FULL_TRANSITIVE" => Level::FullTransitive,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }
}

struct StoredSchema {
    text: String,
    parsed: Schema,
}

#[derive(Default)]
struct Registry {
    /// Index = id - 1.
    schemas: Vec<StoredSchema>,
    by_canonical: HashMap<String, u32>,
    /// subject -> (version, schema id), versions ascending.
    subjects: BTreeMap<String, Vec<(u32, u32)>>,
    global: Option<Level>,
    per_subject: HashMap<String, Level>,
}

type Shared = Arc<Mutex<Registry>>;

struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

fn err(status: StatusCode, code: u32, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        reply(self.status, json!({"error_code": self.code, "message": self.message}))
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body.to_string()).into_response()
}

fn ok(body: Value) -> Result<Response, ApiError> {
    Ok(reply(StatusCode::OK, body))
}

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, Registry> {
    // A panic while holding the lock cannot leave the maps half-updated in a way that matters
    // for a dev tool; keep serving.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
}

fn parse_body(body: &Bytes) -> Result<(String, Schema), ApiError> {
    let body: SchemaBody = serde_json::from_slice(body).map_err(|e| {
        err(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            format!("Unrecognized request body: {e}"),
        )
    })?;
    if let Some(t) = body.schema_type.as_deref() {
        if t != "AVRO" {
            return Err(err(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                format!("Invalid schema: schemaType {t} is not supported by this emulator (AVRO only)"),
            ));
        }
    }
    if !body.references.is_empty() {
        return Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "Invalid schema: references are not supported by this emulator",
        ));
    }
    let parsed = Schema::parse_str(&body.schema)
        .map_err(|e| err(StatusCode::UNPROCESSABLE_ENTITY, 42201, format!("Invalid schema: {e}")))?;
    Ok((body.schema, parsed))
}

impl Registry {
    fn level_for(&self, subject: &str) -> Level {
        self.per_subject
            .get(subject)
            .copied()
            .or(self.global)
            .unwrap_or(Level::Backward)
    }

    fn versions(&self, subject: &str) -> Result<&Vec<(u32, u32)>, ApiError> {
        self.subjects
            .get(subject)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| err(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found.")))
    }

    fn version(&self, subject: &str, version: &str) -> Result<(u32, u32), ApiError> {
        let versions = self.versions(subject)?;
        if version == "latest" || version == "-1" {
            return versions
                .last()
                .copied()
                .ok_or_else(|| err(StatusCode::NOT_FOUND, 40402, "Version latest not found."));
        }
        let wanted: u32 = version.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
            err(StatusCode::UNPROCESSABLE_ENTITY, 42202, format!("The specified version '{version}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""))
        })?;
        versions
            .iter()
            .find(|(v, _)| *v == wanted)
            .copied()
            .ok_or_else(|| err(StatusCode::NOT_FOUND, 40402, format!("Version {wanted} not found.")))
    }

    fn schema(&self, id: u32) -> Option<&StoredSchema> {
        self.schemas.get(id.checked_sub(1)? as usize)
    }

    /// Problems found checking `new` against `existing` (oldest first) at `level`.
    fn incompatibilities(&self, level: Level, new: &Schema, existing: &[(u32, u32)]) -> Vec<String> {
        let against: Vec<&(u32, u32)> = if level.transitive() {
            existing.iter().collect()
        } else {
            existing.last().into_iter().collect()
        };
        let mut messages = Vec::new();
        for (version, id) in against {
            let Some(old) = self.schema(*id) else {
                continue;
            };
            let backward = matches!(
                level,
                Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive
            );
            let forward = matches!(
                level,
                Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive
            );
            if backward {
                if let Some(m) = check(&old.parsed, new) {
                    messages.push(format!(
                        "new schema cannot read data written with version {version}: {m}"
                    ));
                }
            }
            if forward {
                if let Some(m) = check(new, &old.parsed) {
                    messages.push(format!(
                        "version {version} cannot read data written with the new schema: {m}"
                    ));
                }
            }
        }
        messages
    }
}

fn check(writer: &Schema, reader: &Schema) -> Option<String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => None,
        Ok(Compatibility::Partial) => Some("only partly compatible (an enum symbol or union branch is missing)".into()),
        Err(e) => Some(e.to_string()),
    }
}

/// An outage to play (fault tests): while set, every registry call answers this status.
/// `PUT /_emulator/fault` with `{"status": 500}` starts it, `DELETE /_emulator/fault` ends it;
/// the count of refused calls is in `GET /_emulator/fault`. Not part of Confluent's API.
#[derive(Debug, Default)]
struct Fault {
    status: Option<StatusCode>,
    refused: u64,
}

type SharedFault = Arc<Mutex<Fault>>;

fn lock_fault(fault: &SharedFault) -> std::sync::MutexGuard<'_, Fault> {
    fault.lock().unwrap_or_else(|p| p.into_inner())
}

async fn play_fault(
    State(fault): State<SharedFault>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !request.uri().path().starts_with("/_emulator/") {
        let mut f = lock_fault(&fault);
        if let Some(status) = f.status {
            f.refused += 1;
            return err(status, 50001, "emulated outage").into_response();
        }
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct FaultRequest {
    status: u16,
}

fn fault_routes(fault: SharedFault) -> Router {
    Router::new()
        .route(
            "/_emulator/fault",
            get(|State(f): State<SharedFault>| async move {
                let f = lock_fault(&f);
                reply(
                    StatusCode::OK,
                    json!({"status": f.status.map(|s| s.as_u16()), "refused": f.refused}),
                )
            })
            .put(|State(f): State<SharedFault>, body: Bytes| async move {
                let Ok(FaultRequest { status }) = serde_json::from_slice(&body) else {
                    return err(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        42201,
                        "expected {\"status\": <HTTP status>}",
                    )
                    .into_response();
                };
                let Ok(status) = StatusCode::from_u16(status) else {
                    return err(StatusCode::UNPROCESSABLE_ENTITY, 42201, "not an HTTP status").into_response();
                };
                lock_fault(&f).status = Some(status);
                reply(StatusCode::OK, json!({"status": status.as_u16()}))
            })
            .delete(|State(f): State<SharedFault>| async move {
                lock_fault(&f).status = None;
                reply(StatusCode::OK, json!({}))
            }),
        )
        .with_state(fault)
}

pub fn router() -> Router {
    let state: Shared = Arc::new(Mutex::new(Registry::default()));
    let fault: SharedFault = Arc::default();
    Router::new()
        .route("/", get(|| async { reply(StatusCode::OK, json!({})) }))
        .route("/schemas/ids/{id}", get(get_schema))
        .route("/schemas/ids/{id}/versions", get(get_schema_versions))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(get_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(get_version_schema))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(check_one))
        .route("/compatibility/subjects/{subject}/versions", post(check_all))
        .route("/config", get(get_global).put(put_global))
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .route(
            "/mode",
            get(|| async { reply(StatusCode::OK, json!({"mode": "READWRITE"})) }),
        )
        .with_state(state)
        .merge(fault_routes(fault.clone()))
        .layer(axum::middleware::from_fn_with_state(fault, play_fault))
}

/// Serves the emulator on `addr` (port 0 picks one) in the background; returns the bound address.
pub async fn spawn(addr: &str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router()).await;
    });
    Ok(bound)
}

fn parse_id(id: &str) -> Result<u32, ApiError> {
    id.parse()
        .map_err(|_| err(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found")))
}

async fn get_schema(State(s): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let r = lock(&s);
    let stored = r
        .schema(id)
        .ok_or_else(|| err(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found")))?;
    ok(json!({"schema": stored.text}))
}

async fn get_schema_versions(State(s): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let r = lock(&s);
    r.schema(id)
        .ok_or_else(|| err(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found")))?;
    let uses: Vec<Value> = r
        .subjects
        .iter()
        .flat_map(|(subject, vs)| {
            vs.iter()
                .filter(|(_, i)| *i == id)
                .map(move |(v, _)| json!({"subject": subject, "version": v}))
        })
        .collect();
    ok(json!(uses))
}

async fn list_subjects(State(s): State<Shared>) -> Result<Response, ApiError> {
    let r = lock(&s);
    ok(json!(
        r.subjects
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    ))
}

async fn list_versions(State(s): State<Shared>, Path(subject): Path<String>) -> Result<Response, ApiError> {
    let r = lock(&s);
    ok(json!(r.versions(&subject)?.iter().map(|(v, _)| v).collect::<Vec<_>>()))
}

async fn get_version(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let r = lock(&s);
    let (v, id) = r.version(&subject, &version)?;
    let text = r.schema(id).map(|s| s.text.clone()).unwrap_or_default();
    ok(json!({"subject": subject, "version": v, "id": id, "schema": text}))
}

async fn get_version_schema(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let r = lock(&s);
    let (_, id) = r.version(&subject, &version)?;
    let text = r.schema(id).map(|s| s.text.clone()).unwrap_or_default();
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

async fn register(State(s): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let (text, parsed) = parse_body(&body)?;
    let canonical = parsed.canonical_form();
    let mut r = lock(&s);
    let existing_id = r.by_canonical.get(&canonical).copied();
    let versions = r.subjects.get(&subject).cloned().unwrap_or_default();
    if let Some(id) = existing_id {
        if versions.iter().any(|(_, i)| *i == id) {
            return ok(json!({"id": id}));
        }
    }
    let level = r.level_for(&subject);
    if level != Level::None && !versions.is_empty() {
        let problems = r.incompatibilities(level, &parsed, &versions);
        if !problems.is_empty() {
            return Err(err(
                StatusCode::CONFLICT,
                409,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" ({}): {}",
                    level.name(),
                    problems.join("; ")
                ),
            ));
        }
    }
    let id = match existing_id {
        Some(id) => id,
        None => {
            r.schemas.push(StoredSchema { text, parsed });
            let id = r.schemas.len() as u32;
            r.by_canonical.insert(canonical, id);
            id
        }
    };
    let next_version = versions.last().map(|(v, _)| v + 1).unwrap_or(1);
    r.subjects.entry(subject).or_default().push((next_version, id));
    ok(json!({"id": id}))
}

async fn lookup(State(s): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let (_, parsed) = parse_body(&body)?;
    let r = lock(&s);
    let versions = r.versions(&subject)?;
    let id = r.by_canonical.get(&parsed.canonical_form()).copied();
    let found = versions.iter().find(|(_, i)| Some(*i) == id).copied();
    let (version, id) = found.ok_or_else(|| err(StatusCode::NOT_FOUND, 40403, "Schema not found"))?;
    let text = r.schema(id).map(|s| s.text.clone()).unwrap_or_default();
    ok(json!({"subject": subject, "id": id, "version": version, "schema": text}))
}

async fn delete_subject(State(s): State<Shared>, Path(subject): Path<String>) -> Result<Response, ApiError> {
    let mut r = lock(&s);
    let versions: Vec<u32> = r.versions(&subject)?.iter().map(|(v, _)| *v).collect();
    r.subjects.remove(&subject);
    ok(json!(versions))
}

#[derive(Deserialize)]
struct VerboseQuery {
    #[serde(default)]
    verbose: bool,
}

fn compat_reply(problems: Vec<String>, verbose: bool) -> Result<Response, ApiError> {
    if verbose {
        ok(json!({"is_compatible": problems.is_empty(), "messages": problems}))
    } else {
        ok(json!({"is_compatible": problems.is_empty()}))
    }
}

async fn check_one(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<VerboseQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (_, parsed) = parse_body(&body)?;
    let r = lock(&s);
    let target = r.version(&subject, &version)?;
    let mut level = r.level_for(&subject);
    // Against one named version, the transitive levels reduce to their plain form.
    level = match level {
        Level::BackwardTransitive => Level::Backward,
        Level::ForwardTransitive => Level::Forward,
        Level::FullTransitive => Level::Full,
        other => other,
    };
    compat_reply(
        if level == Level::None {
            vec![]
        } else {
            r.incompatibilities(level, &parsed, &[target])
        },
        q.verbose,
    )
}

async fn check_all(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Query(q): Query<VerboseQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (_, parsed) = parse_body(&body)?;
    let r = lock(&s);
    let versions = r.subjects.get(&subject).cloned().unwrap_or_default();
    let level = r.level_for(&subject);
    compat_reply(
        if level == Level::None {
            vec![]
        } else {
            r.incompatibilities(level, &parsed, &versions)
        },
        q.verbose,
    )
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: String,
}

fn parse_level(body: &Bytes) -> Result<Level, ApiError> {
    let c: ConfigBody = serde_json::from_slice(body).map_err(|e| {
        err(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            format!("Invalid compatibility level: {e}"),
        )
    })?;
    Level::parse(&c.compatibility).ok_or_else(|| {
        err(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            format!("Invalid compatibility level: {}", c.compatibility),
        )
    })
}

async fn get_global(State(s): State<Shared>) -> Result<Response, ApiError> {
    let r = lock(&s);
    ok(json!({"compatibilityLevel": r.global.unwrap_or(Level::Backward).name()}))
}

async fn put_global(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let level = parse_level(&body)?;
    lock(&s).global = Some(level);
    ok(json!({"compatibility": level.name()}))
}

#[derive(Deserialize)]
struct DefaultToGlobal {
    #[serde(default, rename = "defaultToGlobal")]
    default_to_global: bool,
}

async fn get_subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Query(q): Query<DefaultToGlobal>,
) -> Result<Response, ApiError> {
    let r = lock(&s);
    match r.per_subject.get(&subject) {
        Some(level) => ok(json!({"compatibilityLevel": level.name()})),
        None if q.default_to_global => ok(json!({"compatibilityLevel": r.global.unwrap_or(Level::Backward).name()})),
        None => Err(err(
            StatusCode::NOT_FOUND,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )),
    }
}

async fn put_subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let level = parse_level(&body)?;
    lock(&s).per_subject.insert(subject, level);
    ok(json!({"compatibility": level.name()}))
}

async fn delete_subject_config(State(s): State<Shared>, Path(subject): Path<String>) -> Result<Response, ApiError> {
    let mut r = lock(&s);
    let level = r.per_subject.remove(&subject).ok_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )
    })?;
    ok(json!({"compatibilityLevel": level.name()}))
}

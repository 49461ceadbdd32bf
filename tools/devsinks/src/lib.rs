//! DEV AND TEST ONLY: real servers on loopback that record what Forfall sends them.
//! - [`MailSink`]: an SMTP server (mailin-embedded) keeping every message it accepts; on request
//!   it plays a mail server's faults (a reply to the end of data that comes too late, a DATA
//!   command held before the message is sent).
//! - [`HttpRecorder`]: an HTTP server keeping every request and answering with a scripted status.
//! - [`agency::AgencyApi`]: a collection agency's case API, strict as the README's generic agency
//!   API, with its faults on request.
//! - [`sms::SmsProviderSim`]: the SMS providers' APIs, strict as their documentation.
//! - [`vipps::VippsSim`]: the Vipps MobilePay ePayment and webhooks APIs, likewise.
//! - [`stripe::StripeSim`]: Stripe Checkout and its webhook endpoints, likewise.
//! - [`swish::SwishSim`]: the Swish Commerce API, over mutual TLS, likewise.
//! - [`ingress::Forwarder`]: a reverse proxy that keeps `Host`, for fixed public URLs (also
//!   over HTTPS, with a certificate of a [`tls::TestPki`]).

pub mod agency;
pub mod debitura;
pub mod ingress;
pub mod sms;
pub mod stripe;
pub mod swish;
pub mod tls;
pub mod vipps;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use mailin_embedded::{Handler, Response, Server, SslConfig, response};

/// One accepted e-mail.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub from: String,
    pub to: Vec<String>,
    pub raw: String,
    /// When the server accepted it (the end of DATA).
    pub received_at: std::time::Instant,
    /// When the server asked for it (right before its 354 reply to DATA). A sender that looks
    /// once more before writing a message looks after this: whatever was true by then, it saw.
    pub asked_at: std::time::Instant,
}

impl ReceivedMail {
    /// A header's value as a mail client shows it: unfolded (RFC 5322 2.2.3) and with
    /// RFC 2047 encoded-words decoded.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.raw.split("\r\n\r\n").next()?;
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(v) = value.as_mut() {
                if line.starts_with([' ', '\t']) {
                    v.push_str(line);
                    continue;
                }
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case(name) {
                    value = Some(v.trim_start().to_owned());
                }
            }
        }
        value.map(|v| decode_encoded_words(v.trim()))
    }

    /// The plain-text body as a mail client shows it: the text/plain part of a multipart
    /// message, its Content-Transfer-Encoding (quoted-printable or base64) undone.
    pub fn body(&self) -> String {
        if let Some(text) = self.part_text("text/plain") {
            return text;
        }
        self.single_part_body()
    }

    /// The HTML alternative, decoded, when the message has one.
    pub fn html(&self) -> Option<String> {
        self.part_text("text/html")
    }

    fn part_text(&self, content_type: &str) -> Option<String> {
        let (kind, sub) = content_type.split_once('/')?;
        let message = mail_parser::MessageParser::default().parse(self.raw.as_bytes())?;
        message
            .parts
            .iter()
            .find(|p| {
                mail_parser::MimeHeaders::is_content_type(*p, kind, sub)
                    && matches!(p.body, mail_parser::PartType::Text(_) | mail_parser::PartType::Html(_))
            })
            .and_then(|p| p.text_contents().map(str::to_owned))
            .filter(|_| message.parts.len() > 1)
    }

    fn single_part_body(&self) -> String {
        use base64::Engine;
        let raw = self.raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        let encoding = self
            .header("Content-Transfer-Encoding")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let bytes = match encoding.as_str() {
            "quoted-printable" => q_decode_body(raw),
            "base64" => {
                let compact: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .unwrap_or_else(|_| raw.as_bytes().to_vec())
            }
            _ => raw.as_bytes().to_vec(),
        };
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The faults the sink has been asked to play, each on one message, in order.
#[derive(Clone, Default)]
struct Faults {
    /// Delays of the reply to the end of data, one per message (the message is kept first).
    stall_after_data: Arc<Mutex<VecDeque<Duration>>>,
    /// DATA commands to hold before the server asks for the message.
    hold: Arc<(Mutex<Hold>, Condvar)>,
}

#[derive(Default)]
struct Hold {
    /// DATA commands still to hold.
    armed: usize,
    /// DATA commands held right now.
    holding: usize,
    released: bool,
}

/// A held DATA command goes on by itself after this long, so that a test that forgot to
/// release it does not keep a server thread forever.
const LONGEST_HOLD: Duration = Duration::from_secs(120);

impl Faults {
    fn hold_if_armed(&self) {
        let (lock, released) = &*self.hold;
        let mut hold = lock.lock().unwrap_or_else(|p| p.into_inner());
        if hold.armed == 0 {
            return;
        }
        hold.armed -= 1;
        hold.holding += 1;
        let (mut hold, _) = released
            .wait_timeout_while(hold, LONGEST_HOLD, |h| !h.released)
            .unwrap_or_else(|p| p.into_inner());
        hold.holding -= 1;
    }

    fn next_stall(&self) -> Option<Duration> {
        self.stall_after_data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

#[derive(Clone)]
struct MailHandler {
    store: Arc<Mutex<Vec<ReceivedMail>>>,
    current: Option<ReceivedMail>,
    faults: Faults,
}

impl Handler for MailHandler {
    fn data_start(&mut self, _domain: &str, from: &str, _is8bit: bool, to: &[String]) -> Response {
        // Held before the 354 that asks for the message: the sender has sent none of it yet.
        self.faults.hold_if_armed();
        self.current = Some(ReceivedMail {
            from: from.to_owned(),
            to: to.to_vec(),
            raw: String::new(),
            received_at: std::time::Instant::now(),
            asked_at: std::time::Instant::now(),
        });
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Some(m) = self.current.as_mut() {
            m.raw.push_str(&String::from_utf8_lossy(buf));
        }
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        if let Some(mut m) = self.current.take() {
            m.received_at = std::time::Instant::now();
            self.store.lock().unwrap_or_else(|p| p.into_inner()).push(m);
        }
        // The message is kept either way: a stalled reply only hides that from the sender.
        if let Some(delay) = self.faults.next_stall() {
            std::thread::sleep(delay);
        }
        response::OK
    }

    fn helo(&mut self, _ip: IpAddr, _domain: &str) -> Response {
        response::OK
    }

    /// A mailbox on [`NO_SUCH_MAILBOX_DOMAIN`] does not exist: 550, as a real server answers.
    fn rcpt(&mut self, to: &str) -> Response {
        let domain = to.rsplit_once('@').map(|(_, d)| d.trim_end_matches('>'));
        if domain.is_some_and(|d| d.eq_ignore_ascii_case(NO_SUCH_MAILBOX_DOMAIN)) {
            response::NO_MAILBOX
        } else {
            response::OK
        }
    }
}

/// Recipients on this domain are refused by [`MailSink`] (550, mailbox unavailable).
pub const NO_SUCH_MAILBOX_DOMAIN: &str = "no-such-mailbox.example.test";

/// A real SMTP server on 127.0.0.1 (port chosen by the OS) keeping every message.
#[derive(Clone)]
pub struct MailSink {
    pub addr: SocketAddr,
    store: Arc<Mutex<Vec<ReceivedMail>>>,
    faults: Faults,
}

impl MailSink {
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Mutex::new(Vec::new()));
        let faults = Faults::default();
        let handler = MailHandler {
            store: store.clone(),
            current: None,
            faults: faults.clone(),
        };
        let mut server = Server::new(handler);
        // One thread per open connection: senders keep pooled connections open (dispatch one
        // per slot, `dispatch.concurrency`, which benchmarks raise to 128 and more), and a
        // crashed sender's connections linger until the kernel notices, so leave plenty of
        // room: a connection beyond the threads waits, unanswered, for one to free.
        server
            .with_name("forfall-mail-sink")
            .with_num_threads(256)
            .with_ssl(SslConfig::None)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_tcp_listener(listener);
        std::thread::Builder::new().name("mail-sink".into()).spawn(move || {
            let _ = server.serve();
        })?;
        Ok(Self { addr, store, faults })
    }

    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many messages were received (without copying them: a benchmark polls this).
    pub fn count(&self) -> usize {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// When each message was received, in order (without copying them: a benchmark reads this).
    pub fn received_times(&self) -> Vec<std::time::Instant> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.iter().map(|m| m.received_at).collect()
    }

    /// Messages to one recipient.
    pub fn to(&self, address: &str) -> Vec<ReceivedMail> {
        self.messages()
            .into_iter()
            .filter(|m| m.to.iter().any(|t| t == address))
            .collect()
    }

    /// Fault: the next message is received and kept (it is among [`MailSink::messages`], as a
    /// real server would have queued it), but the reply to its end of data comes only after
    /// `delay`. A sender whose timeout is shorter cannot tell whether the server took it.
    pub fn stall_reply_after_next_message(&self, delay: Duration) {
        self.faults
            .stall_after_data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(delay);
    }

    /// Fault: the next DATA command is held, before the server asks for the message (so the
    /// sender has sent nothing of it yet), until [`MailSink::release_data`] (or two minutes).
    pub fn hold_next_data(&self) {
        let (lock, _) = &*self.faults.hold;
        let mut hold = lock.lock().unwrap_or_else(|p| p.into_inner());
        hold.armed += 1;
        hold.released = false;
    }

    /// How many DATA commands are held right now.
    pub fn holding(&self) -> usize {
        let (lock, _) = &*self.faults.hold;
        lock.lock().unwrap_or_else(|p| p.into_inner()).holding
    }

    /// Lets every held DATA command go on.
    pub fn release_data(&self) {
        let (lock, released) = &*self.faults.hold;
        lock.lock().unwrap_or_else(|p| p.into_inner()).released = true;
        released.notify_all();
    }
}

/// One recorded HTTP request.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    pub(crate) fn new(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Self {
        Self {
            method: method.to_string(),
            path: uri.path().to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: body.to_vec(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Clone, Default)]
struct Script {
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    /// Statuses to answer with, in order; the last repeats. Empty = 201.
    statuses: Arc<Mutex<Vec<u16>>>,
}

/// A real HTTP server on 127.0.0.1 recording every request.
#[derive(Clone)]
pub struct HttpRecorder {
    pub addr: SocketAddr,
    script: Script,
}

impl HttpRecorder {
    pub async fn start() -> anyhow::Result<Self> {
        let script = Script::default();
        let app = axum::Router::new().fallback(record).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, script })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answer the next requests with these statuses (the last one repeats).
    pub fn answer_with(&self, statuses: &[u16]) {
        *self.script.statuses.lock().unwrap_or_else(|p| p.into_inner()) = statuses.to_vec();
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.script.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn record(
    State(script): State<Script>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let request = RecordedRequest::new(&method, &uri, &headers, &body);
    let n = {
        let mut requests = script.requests.lock().unwrap_or_else(|p| p.into_inner());
        requests.push(request);
        requests.len()
    };
    let status = {
        let statuses = script.statuses.lock().unwrap_or_else(|p| p.into_inner());
        statuses.get(n - 1).or(statuses.last()).copied().unwrap_or(201)
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(serde_json::json!({"reference": format!("AG-{n}")})))
}

/// Decodes RFC 2047 encoded-words (`=?charset?B|Q?text?=`, UTF-8 and US-ASCII); whitespace
/// between two adjacent encoded-words is not part of the text (RFC 2047 section 6.2).
pub fn decode_encoded_words(value: &str) -> String {
    use base64::Engine;
    let mut out = String::new();
    let mut rest = value;
    let mut last_was_word = false;
    while !rest.is_empty() {
        let Some(start) = rest.find("=?") else {
            out.push_str(rest);
            break;
        };
        let (before, candidate) = rest.split_at(start);
        let decoded = candidate[2..].splitn(3, '?').collect::<Vec<_>>();
        let parsed = (decoded.len() == 3)
            .then(|| {
                let (charset, encoding, tail) = (decoded[0], decoded[1], decoded[2]);
                let end = tail.find("?=")?;
                let text = &tail[..end];
                let bytes = match encoding {
                    "B" | "b" => base64::engine::general_purpose::STANDARD.decode(text).ok()?,
                    "Q" | "q" => q_decode(text),
                    _ => return None,
                };
                let ok_charset = ["utf-8", "us-ascii"].iter().any(|c| charset.eq_ignore_ascii_case(c));
                let consumed = 2 + charset.len() + 1 + encoding.len() + 1 + end + 2;
                ok_charset.then(|| (String::from_utf8_lossy(&bytes).into_owned(), consumed))
            })
            .flatten();
        match parsed {
            Some((text, consumed)) => {
                if !(last_was_word && before.trim().is_empty()) {
                    out.push_str(before);
                }
                out.push_str(&text);
                rest = &candidate[consumed..];
                last_was_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &candidate[2..];
                last_was_word = false;
            }
        }
    }
    out
}

/// Quoted-printable body decoding (RFC 2045 6.7): soft line breaks removed, `=XX` decoded.
fn q_decode_body(text: &str) -> Vec<u8> {
    let joined = text.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn q_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'_' => out.push(b' '),
            b'=' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'='),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_encoded_words_like_a_mail_client() {
        assert_eq!(
            decode_encoded_words("Din faktura =?utf-8?b?ZsO2cmZhbGxlcg==?= i dag"),
            "Din faktura förfaller i dag"
        );
        assert_eq!(
            decode_encoded_words("=?utf-8?b?UMOlbWlubmVsc2U6?= din"),
            "Påminnelse: din"
        );
        assert_eq!(
            decode_encoded_words("=?UTF-8?Q?caf=C3=A9_au_lait?= ok"),
            "café au lait ok"
        );
        assert_eq!(
            decode_encoded_words("=?utf-8?b?w6Q=?= =?utf-8?b?w7Y=?="),
            "äö",
            "space between words is dropped"
        );
        assert_eq!(decode_encoded_words("plain =? text"), "plain =? text");
    }

    #[test]
    fn decodes_quoted_printable_bodies() {
        let mail = ReceivedMail {
            from: String::new(),
            to: vec![],
            raw: "Content-Transfer-Encoding: quoted-printable\r\n\r\nBel=C3=B8b: 1.234,50=C2=A0kr.=\r\n ok".into(),
            received_at: std::time::Instant::now(),
            asked_at: std::time::Instant::now(),
        };
        assert_eq!(mail.body(), "Beløb: 1.234,50\u{a0}kr. ok");
    }
}

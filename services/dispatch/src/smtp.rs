//! E-mail out over SMTP with lettre's connection, on our own sockets and pool.
//!
//! Why not lettre's transport: it writes the message body and the final `.` as two writes
//! without TCP_NODELAY, so Nagle's algorithm holds the `.` until the server acknowledges the
//! body, and a server that delays its ACK (Linux: 40 ms) stalls every message. That stall
//! is also time in which a crash leaves the delivery unknown. Here every socket has
//! TCP_NODELAY set and idle connections are reused.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lettre::Message;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;

use crate::SmtpSettings;
use crate::channels::SendError;

/// Refuses settings that cannot work or would leak the password.
pub fn check(settings: &SmtpSettings) -> anyhow::Result<()> {
    match settings.tls.as_str() {
        "none" | "starttls" | "tls" => {}
        other => anyhow::bail!("dispatch.smtp.tls is '{other}': expected none, starttls or tls"),
    }
    // AUTH PLAIN and LOGIN send the password as it is: only inside TLS.
    anyhow::ensure!(
        settings.tls != "none" || (settings.username.is_none() && settings.password.is_none()),
        "dispatch.smtp has a username or password but dispatch.smtp.tls is none: the password \
         would cross the network in clear; set tls to starttls or tls"
    );
    Ok(())
}

pub struct SmtpClient {
    settings: SmtpSettings,
    hello: ClientId,
    idle: Mutex<Vec<AsyncSmtpConnection>>,
    max_idle: usize,
}

impl SmtpClient {
    pub fn new(settings: SmtpSettings, max_idle: usize) -> anyhow::Result<Self> {
        check(&settings)?;
        Ok(Self {
            settings,
            hello: ClientId::default(),
            idle: Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.timeout_ms)
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let s = &self.settings;
        let smtp = |e: lettre::transport::smtp::Error| classify(e);
        let tls = || TlsParameters::new(s.host.clone()).map_err(smtp);
        let mut connection = if s.tls == "tls" {
            // Implicit TLS needs the handshake before the greeting: lettre's own connect.
            AsyncSmtpConnection::connect_tokio1(
                (s.host.as_str(), s.port),
                Some(self.timeout()),
                &self.hello,
                Some(tls()?),
                None,
            )
            .await
            .map_err(smtp)?
        } else {
            let unreachable = |e: std::io::Error| SendError::Transient(format!("SMTP server unreachable: {e}"));
            let stream = tokio::time::timeout(
                self.timeout(),
                tokio::net::TcpStream::connect((s.host.as_str(), s.port)),
            )
            .await
            .map_err(|_| SendError::Transient("SMTP connection timed out".into()))?
            .map_err(unreachable)?;
            stream.set_nodelay(true).map_err(unreachable)?;
            let mut connection = AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
                .await
                .map_err(smtp)?;
            if s.tls == "starttls" {
                connection.starttls(tls()?, &self.hello).await.map_err(smtp)?;
            }
            connection
        };
        if let (Some(user), Some(pass)) = (&s.username, &s.password) {
            connection
                .auth(
                    &[Mechanism::Plain, Mechanism::Login],
                    &Credentials::new(user.clone(), pass.clone()),
                )
                .await
                .map_err(smtp)?;
        }
        Ok(connection)
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give_back(&self, connection: AsyncSmtpConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle && !connection.has_broken() {
            idle.push(connection);
        }
    }

    /// Sends one message. `commit` runs after the server has accepted sender and recipients
    /// and said to go ahead with the data, right before the message itself is written: only
    /// from then on may the server have the message. If `commit` fails nothing was sent.
    ///
    /// Before the commit point, permanent (5xx) refusals are not retried and anything else is
    /// transient. After it, only the server's own reply to the end of the data says that it did
    /// not take the message (RFC 5321 4.1.1.4 and 6.1: a server takes responsibility for a message
    /// only with its 250 to the end of data): a 5xx is permanent, a 4xx transient. No reply (a
    /// timeout, a broken connection) leaves the delivery unknown. A message is written to one
    /// connection at most once.
    pub async fn send<F, Fut>(&self, message: &Message, commit: F) -> Result<(), SendError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), SendError>>,
    {
        // An idle connection the server has closed meanwhile is found with a NOOP, before
        // anything of the message is written.
        let mut connection = loop {
            match self.take_idle() {
                Some(mut c) => {
                    if c.test_connected().await {
                        break c;
                    }
                    abort(c).await;
                }
                None => break self.connect().await?,
            }
        };
        let committed = AtomicBool::new(false);
        let result = tokio::time::timeout(self.timeout(), transact(&mut connection, message, commit, &committed)).await;
        match result {
            Ok(Ok(())) => {
                self.give_back(connection);
                Ok(())
            }
            Ok(Err(e)) => {
                abort(connection).await;
                Err(e)
            }
            Err(_) => {
                abort(connection).await;
                if committed.load(Ordering::SeqCst) {
                    Err(SendError::Unknown(format!(
                        "the SMTP server did not answer within {} ms after the message was written",
                        self.settings.timeout_ms
                    )))
                } else {
                    Err(SendError::Transient("SMTP send timed out".into()))
                }
            }
        }
    }
}

/// Closes a connection that failed. lettre's `abort` says QUIT and waits for the reply, which
/// never comes from a server waiting for the message's data (after DATA the QUIT would only be
/// more data): so it gets a moment, and the connection is dropped after it either way (a server
/// discards a message whose data never ended).
async fn abort(mut connection: AsyncSmtpConnection) {
    let _ = tokio::time::timeout(Duration::from_millis(200), connection.abort()).await;
}

/// MAIL, RCPT, DATA, then `commit`, then the message (as lettre's own `send` does it, with the
/// commit point between). `committed` tells the caller, even when this is cut short by its
/// timeout, whether the commit point was passed.
async fn transact<F, Fut>(
    connection: &mut AsyncSmtpConnection,
    message: &Message,
    commit: F,
    committed: &AtomicBool,
) -> Result<(), SendError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), SendError>>,
{
    use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
    use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
    let envelope = message.envelope();
    let bytes = message.formatted();
    let mut options = Vec::new();
    let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
    let non_ascii_address = envelope.from().is_some_and(|a| !ascii(a)) || envelope.to().iter().any(|a| !ascii(a));
    if non_ascii_address {
        if !connection.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err(SendError::Permanent(
                "the address has non-ASCII characters and the SMTP server does not support SMTPUTF8".into(),
            ));
        }
        options.push(MailParameter::SmtpUtfEight);
    }
    if !bytes.is_ascii() && connection.server_info().supports_feature(Extension::EightBitMime) {
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    connection
        .command(Mail::new(envelope.from().cloned(), options))
        .await
        .map_err(classify)?;
    for to in envelope.to() {
        connection
            .command(Rcpt::new(to.clone(), vec![]))
            .await
            .map_err(classify)?;
    }
    connection.command(Data).await.map_err(classify)?;
    commit().await?;
    committed.store(true, Ordering::SeqCst);
    connection.message(&bytes).await.map_err(after_data)?;
    Ok(())
}

/// A failure once the message is being written: the server's reply to the end of data decides
/// (it has not taken the message unless it says 250); without a reply the delivery is unknown.
fn after_data(e: lettre::transport::smtp::Error) -> SendError {
    if e.is_permanent() || e.is_transient() {
        classify(e)
    } else {
        SendError::Unknown(format!("the SMTP connection failed after the message was written: {e}"))
    }
}

fn classify(e: lettre::transport::smtp::Error) -> SendError {
    if e.is_permanent() {
        SendError::Permanent(format!("SMTP server refused the message: {e}"))
    } else {
        SendError::Transient(format!("SMTP send failed: {e}"))
    }
}

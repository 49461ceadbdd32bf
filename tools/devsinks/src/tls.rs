//! DEV AND TEST ONLY: a certificate authority made for one test run, and an HTTPS listener
//! for axum that may demand a client certificate (mutual TLS, as Swish's API does).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslVerifyMode};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509, X509Builder, X509NameBuilder};

/// A certificate and its private key, in PEM (the key as PKCS #8).
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `<name>.crt` and `<name>.key` into `dir`; their paths.
    pub fn write_to(&self, dir: &std::path::Path, name: &str) -> anyhow::Result<(String, String)> {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        std::fs::write(&key, &self.key_pem)?;
        Ok((cert.display().to_string(), key.display().to_string()))
    }
}

/// A certificate authority of one test run: it issues the servers' certificates (for
/// 127.0.0.1) and the clients' (by common name, as Swish issues a merchant's for its Swish
/// number).
pub struct TestPki {
    ca: X509,
    ca_key: PKey<Private>,
    /// The authority's certificate, to trust.
    pub ca_pem: String,
}

fn new_key() -> anyhow::Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn name(common_name: &str) -> anyhow::Result<openssl::x509::X509Name> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(name.build())
}

fn builder(common_name: &str, key: &PKey<Private>) -> anyhow::Result<X509Builder> {
    let name = name(common_name)?;
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(128, MsbOption::MAYBE_ZERO, false)?;
    b.set_serial_number(&*serial.to_asn1_integer()?)?;
    b.set_subject_name(&name)?;
    b.set_pubkey(key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(2)?)?;
    Ok(b)
}

impl TestPki {
    pub fn new() -> anyhow::Result<Self> {
        let ca_key = new_key()?;
        let mut b = builder("Forfall test CA", &ca_key)?;
        b.set_issuer_name(&*name("Forfall test CA")?)?;
        b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build()?)?;
        b.sign(&ca_key, MessageDigest::sha256())?;
        let ca = b.build();
        let ca_pem = String::from_utf8(ca.to_pem()?)?;
        Ok(Self { ca, ca_key, ca_pem })
    }

    fn issue(&self, common_name: &str, server: bool) -> anyhow::Result<Issued> {
        let key = new_key()?;
        let mut b = builder(common_name, &key)?;
        b.set_issuer_name(self.ca.subject_name())?;
        b.append_extension(BasicConstraints::new().build()?)?;
        b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        if server {
            b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
            let san = SubjectAlternativeName::new()
                .ip("127.0.0.1")
                .dns("localhost")
                .build(&b.x509v3_context(Some(&self.ca), None))?;
            b.append_extension(san)?;
        } else {
            b.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
        }
        b.sign(&self.ca_key, MessageDigest::sha256())?;
        Ok(Issued {
            cert_pem: String::from_utf8(b.build().to_pem()?)?,
            key_pem: String::from_utf8(key.private_key_to_pem_pkcs8()?)?,
        })
    }

    /// A server's certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> anyhow::Result<Issued> {
        self.issue("127.0.0.1", true)
    }

    /// A client's certificate with this common name.
    pub fn client(&self, common_name: &str) -> anyhow::Result<Issued> {
        self.issue(common_name, false)
    }

    /// An HTTPS acceptor with a fresh server certificate; with `client_certificates`, it
    /// completes no handshake without a client certificate this authority issued.
    pub fn acceptor(&self, client_certificates: bool) -> anyhow::Result<Arc<SslAcceptor>> {
        let server = self.server()?;
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        b.set_private_key(&*PKey::private_key_from_pem(server.key_pem.as_bytes())?)?;
        b.set_certificate(&*X509::from_pem(server.cert_pem.as_bytes())?)?;
        if client_certificates {
            b.cert_store_mut().add_cert(self.ca.clone())?;
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        Ok(Arc::new(b.build()))
    }

    /// A client that trusts this authority only.
    pub fn client_trusting(&self) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?])
            .timeout(Duration::from_secs(10))
            .build()?)
    }
}

/// Who is on the other end of an HTTPS connection.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub addr: SocketAddr,
    /// The common name of the client's certificate, when it showed one.
    pub client_common_name: Option<String>,
}

/// A TCP listener whose connections are TLS, for `axum::serve`. A handshake that fails (no
/// client certificate where one is demanded, an untrusted one) drops that connection only.
pub struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: Arc<SslAcceptor>,
}

impl TlsListener {
    pub async fn bind(acceptor: Arc<SslAcceptor>) -> anyhow::Result<Self> {
        Ok(Self {
            tcp: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            acceptor,
        })
    }

    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> anyhow::Result<tokio_openssl::SslStream<tokio::net::TcpStream>> {
        let ssl = Ssl::new(self.acceptor.context())?;
        let mut stream = tokio_openssl::SslStream::new(ssl, tcp)?;
        tokio::time::timeout(Duration::from_secs(5), Pin::new(&mut stream).accept()).await??;
        Ok(stream)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_openssl::SslStream<tokio::net::TcpStream>;
    type Addr = TlsPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(stream) = self.handshake(tcp).await else {
                continue;
            };
            let client_common_name = stream.ssl().peer_certificate().and_then(|c| {
                c.subject_name()
                    .entries_by_nid(Nid::COMMONNAME)
                    .next()
                    .and_then(|e| e.data().to_string().ok())
            });
            return (
                stream,
                TlsPeer {
                    addr,
                    client_common_name,
                },
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(TlsPeer {
            addr: self.tcp.local_addr()?,
            client_common_name: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for TlsPeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

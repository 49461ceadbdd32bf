//! DEV AND TEST ONLY: an ingress in front of a service on loopback.

/// A reverse proxy on loopback, standing where an ingress stands in front of a service: it
/// passes each request on unchanged, `Host` included, to wherever `target` says the service is
/// now. A provider's webhook is registered once with a fixed URL, while a test's services take
/// a new port at each start.
pub struct Forwarder {
    pub addr: std::net::SocketAddr,
}

impl Forwarder {
    pub async fn start(
        target: impl Fn() -> Option<std::net::SocketAddr> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Self::app(target)?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr })
    }

    /// The same over HTTPS, with a server certificate of `pki` (for a provider that calls back
    /// only over HTTPS).
    pub async fn start_tls(
        pki: &crate::tls::TestPki,
        target: impl Fn() -> Option<std::net::SocketAddr> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let listener = crate::tls::TlsListener::bind(pki.acceptor(false)?).await?;
        let addr = listener.addr()?;
        let app = Self::app(target)?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr })
    }

    fn app(target: impl Fn() -> Option<std::net::SocketAddr> + Send + Sync + 'static) -> anyhow::Result<axum::Router> {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use axum::response::IntoResponse;
        let target = std::sync::Arc::new(target);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let forward = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (target, http) = (target.clone(), http.clone());
            async move {
                let Some(addr) = target() else {
                    return StatusCode::BAD_GATEWAY.into_response();
                };
                let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                let mut request = http.request(method, format!("http://{addr}{path}")).body(body);
                for (name, value) in &headers {
                    request = request.header(name, value);
                }
                match request.send().await {
                    Ok(r) => {
                        let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                        let mut headers = HeaderMap::new();
                        for (name, value) in r.headers() {
                            if name != "transfer-encoding" && name != "content-length" {
                                headers.append(name.clone(), value.clone());
                            }
                        }
                        (status, headers, r.bytes().await.unwrap_or_default()).into_response()
                    }
                    Err(_) => StatusCode::BAD_GATEWAY.into_response(),
                }
            }
        };
        Ok(axum::Router::new().fallback(forward))
    }
}

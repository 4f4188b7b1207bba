//! The one outbound HTTP client set-up, shared by the upstream proxy, the JWKS fetcher and the
//! payment providers' API clients.

use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooled client for `http` and `https` URLs sending bodies of type `B`.
pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// A client speaking HTTP/1.1 and HTTP/2 (by ALPN), verifying servers against the bundled web
/// PKI roots, with `TCP_NODELAY` (small requests and SSE frames leave at once), giving up on a
/// connection attempt after `connect_timeout` and closing pooled connections idle for
/// `pool_idle`.
pub fn https_client<B>(connect_timeout: Duration, pool_idle: Duration) -> HttpsClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool_idle)
        .build(https)
}

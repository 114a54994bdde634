//! Placeholder: the read-only OCI distribution endpoint is being written on its own branch.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};

pub fn respond(_store: &std::path::Path, _method: &Method, _path: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

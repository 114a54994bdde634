//! A lean HTTP/1.1 client for a model endpoint reached over plain HTTP (a
//! local model server; the stand-in in tests and benchmarks).
//!
//! Why not reqwest here: its connection runs as a task of its own and hands
//! an answer over one chunk (one SSE event) per turn of that task, after
//! decoding the chunked framing a byte at a time; for a fast stream that was
//! most of the gateway's work. Here the answer is read by the agent's own
//! connection task, as much as the socket holds per read, and its chunk
//! framing is stripped in one pass (`Reader`), so that many events pass on
//! as one piece. HTTPS endpoints, and plain ones reached through a proxy from
//! the environment, still go through reqwest.
//!
//! Connections are kept alive and reused, as reqwest's pool did: an idle one
//! found closed is dropped, and a request whose write fails on a reused one
//! is sent once more on a new one. A request that was written is never sent
//! twice.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection older than this is not reused.
const IDLE_FOR: Duration = Duration::from_secs(60);
const MAX_IDLE: usize = 16;
/// A response head larger than this is refused.
const MAX_HEAD: usize = 256 << 10;
const MAX_HEADERS: usize = 128;
/// What one read asks the socket for.
const READ_SIZE: usize = 64 << 10;

/// Where the endpoint is, and its idle connections.
pub(crate) struct Endpoint {
    host: Host,
    port: u16,
    /// The `Host` header: the URL's host, and its port unless the default.
    authority: String,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

enum Host {
    Ip(IpAddr),
    Name(String),
}

/// Why a request got no answer (or its answer broke off). Names no header
/// and no part of the request, so it holds no key.
#[derive(Debug)]
pub(crate) enum Error {
    Connect(io::Error),
    Io(io::Error),
    /// The endpoint closed the connection before the answer's end.
    Closed,
    /// Not an HTTP/1 answer cohort can read.
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "cannot connect: {e}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Closed => f.write_str("the connection was closed before the answer's end"),
            Error::Protocol(why) => write!(f, "invalid HTTP answer: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

/// An answer's status and headers, and the reader of its body.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Reader,
}

impl Endpoint {
    /// `None` unless `url` is plain HTTP.
    pub(crate) fn new(url: &reqwest::Url) -> Option<Endpoint> {
        if url.scheme() != "http" {
            return None;
        }
        let name = url.host_str()?;
        let host = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            Some(v6) => Host::Ip(IpAddr::V6(v6.parse().ok()?)),
            None => match name.parse::<std::net::Ipv4Addr>() {
                Ok(v4) => Host::Ip(IpAddr::V4(v4)),
                Err(_) => Host::Name(name.to_string()),
            },
        };
        let mut authority = name.to_string();
        if let Some(port) = url.port() {
            authority.push_str(&format!(":{port}"));
        }
        Some(Endpoint {
            host,
            port: url.port_or_known_default()?,
            authority,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends one request and reads its answer's head. `target` is the path
    /// and query; `headers` are the agent's, already stripped of what the
    /// gateway sets itself (`Host`, `Authorization`, `Content-Length`) and of
    /// hop-by-hop ones.
    pub(crate) async fn send(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        key: &str,
        body: &Bytes,
    ) -> Result<Answer, Error> {
        let head = self.request_head(method, target, headers, key, body.len());
        loop {
            let (mut stream, reused) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect().await.map_err(Error::Connect)?, false),
            };
            match write_request(&mut stream, &head, body).await {
                Ok(()) => {}
                // A kept-alive connection the endpoint has closed meanwhile:
                // nothing was sent, so try a new one.
                Err(_) if reused => continue,
                Err(e) => return Err(Error::Io(e)),
            }
            return read_head(stream, *method == Method::HEAD).await;
        }
    }

    fn request_head(&self, method: &Method, target: &str, headers: &HeaderMap, key: &str, len: usize) -> Vec<u8> {
        let mut h = Vec::with_capacity(256 + headers.len() * 48);
        h.extend_from_slice(method.as_str().as_bytes());
        h.push(b' ');
        h.extend_from_slice(target.as_bytes());
        h.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        h.extend_from_slice(self.authority.as_bytes());
        h.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            h.extend_from_slice(name.as_str().as_bytes());
            h.extend_from_slice(b": ");
            h.extend_from_slice(value.as_bytes());
            h.extend_from_slice(b"\r\n");
        }
        h.extend_from_slice(b"authorization: Bearer ");
        h.extend_from_slice(key.as_bytes());
        h.extend_from_slice(b"\r\n");
        let bodiless = matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS);
        if len > 0 || !bodiless {
            h.extend_from_slice(format!("content-length: {len}\r\n").as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        h
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let dial = async {
            let addrs: Vec<SocketAddr> = match &self.host {
                Host::Ip(ip) => vec![SocketAddr::new(*ip, self.port)],
                Host::Name(name) => tokio::net::lookup_host((name.as_str(), self.port)).await?.collect(),
            };
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host has no address")))
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, dial)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))??;
        // Requests are written whole; SSE events must not wait for Nagle on the way back either.
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// An idle connection that is still open, newest first.
    fn checkout(&self) -> Option<TcpStream> {
        let mut idle = super::lock(&self.idle);
        while let Some((stream, since)) = idle.pop() {
            if since.elapsed() > IDLE_FOR {
                continue;
            }
            // Nothing may be waiting on an idle connection: an end (the
            // endpoint closed it) or stray bytes both rule it out.
            match stream.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(stream),
                _ => continue,
            }
        }
        None
    }

    /// Keeps a connection whose answer was read to its end, for the next request.
    pub(crate) fn release(&self, stream: TcpStream) {
        let mut idle = super::lock(&self.idle);
        idle.retain(|(_, since)| since.elapsed() <= IDLE_FOR);
        if idle.len() < MAX_IDLE {
            idle.push((stream, Instant::now()));
        }
    }

    /// Closes the idle connections (the gateway is stopping).
    pub(crate) fn close_idle(&self) {
        super::lock(&self.idle).clear();
    }
}

async fn write_request(stream: &mut TcpStream, head: &[u8], body: &Bytes) -> io::Result<()> {
    if body.len() <= 16 << 10 {
        // One write, so one packet for the usual small request.
        let mut all = Vec::with_capacity(head.len() + body.len());
        all.extend_from_slice(head);
        all.extend_from_slice(body);
        stream.write_all(&all).await
    } else {
        stream.write_all(head).await?;
        stream.write_all(body).await
    }
}

/// Reads the answer's head (skipping interim 1xx answers) and works out how its body is framed.
async fn read_head(mut stream: TcpStream, head_request: bool) -> Result<Answer, Error> {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    loop {
        if !buf.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = parsed.code.unwrap_or(0);
                    if (100..200).contains(&code) && code != 101 {
                        buf.advance(len);
                        continue;
                    }
                    let head = Head::new(&parsed, head_request)?;
                    buf.advance(len);
                    return Ok(Answer {
                        status: head.status,
                        headers: head.headers,
                        body: Reader {
                            stream: Some(stream),
                            buf,
                            framing: head.framing,
                            keep_alive: head.keep_alive,
                        },
                    });
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(Error::Protocol("the head is too large".into()));
        }
        buf.reserve(READ_SIZE);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(Error::Closed);
        }
        quickack(&stream);
    }
}

/// Asks the kernel to acknowledge what arrives next at once, not after its
/// delayed-ACK timer (40 ms on Linux). An endpoint without `TCP_NODELAY` (the
/// stand-in is one: hyper's default) holds each small write back until its
/// last one is acknowledged (Nagle); with delayed ACKs on our side a fast
/// stream then stalls for the timer, again and again. The kernel leaves
/// quick-ACK mode by itself, so this is asked after every read. A failure
/// only means ACKs may be delayed.
fn quickack(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: a socket descriptor that lives as long as `stream`, and an
    // option value that is a c_int of the size given.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

impl Head {
    /// RFC 9112 §6.3: how the body's length is known.
    fn new(parsed: &httparse::Response<'_, '_>, head_request: bool) -> Result<Head, Error> {
        let bad = |why: &str| Error::Protocol(why.to_string());
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| bad("no valid status"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(bad("an upgrade that was not asked for"));
        }
        let mut headers = HeaderMap::with_capacity(parsed.headers.len());
        let mut chunked = None;
        let mut length: Option<u64> = None;
        let mut keep_alive = parsed.version == Some(1);
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("an invalid header name"))?;
            let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("an invalid header value"))?;
            if name == hyper::header::TRANSFER_ENCODING {
                // Only the last coding says whether the body is chunked.
                let last = value.to_str().ok().and_then(|v| v.rsplit(',').next()).map(str::trim);
                chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")));
            } else if name == hyper::header::CONTENT_LENGTH {
                for part in value.to_str().map_err(|_| bad("an invalid Content-Length"))?.split(',') {
                    let n: u64 = part.trim().parse().map_err(|_| bad("an invalid Content-Length"))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(bad("Content-Length given twice, differently"));
                    }
                    length = Some(n);
                }
            } else if name == hyper::header::CONNECTION {
                let close = value
                    .to_str()
                    .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
                    .unwrap_or(false);
                keep_alive &= !close;
            }
            headers.append(name, value);
        }
        let no_body = head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        if chunked.is_some() {
            // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), and
            // the length passed on is the one hyper works out again.
            headers.remove(hyper::header::CONTENT_LENGTH);
        }
        let framing = if no_body {
            Framing::Length(0)
        } else if let Some(chunked) = chunked {
            // Both: Transfer-Encoding wins, and the connection is not reused.
            keep_alive &= length.is_none();
            if chunked {
                Framing::Chunked(Chunked::default())
            } else {
                Framing::Close
            }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        if matches!(framing, Framing::Close) {
            keep_alive = false;
        }
        Ok(Head {
            status,
            headers,
            framing,
            keep_alive,
        })
    }
}

enum Framing {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the endpoint closes the connection.
    Close,
    Done,
}

/// An answer's body, read from its connection in the task that polls it.
pub(crate) struct Reader {
    stream: Option<TcpStream>,
    /// Read and not yet decoded.
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
}

/// What `Reader::poll_read` got.
pub(crate) enum Read {
    /// Some body, maybe with the end.
    More,
    /// Nothing more is there yet.
    Pending,
    /// The body has ended.
    End,
}

impl Reader {
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    /// Appends body bytes to `out`, up to `limit` in all: first what is
    /// buffered, then what the socket has, as long as it has some; never waits.
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>, out: &mut BytesMut, limit: usize) -> Result<Read, Error> {
        let start = out.len();
        loop {
            self.decode(out, limit)?;
            if self.is_done() {
                return Ok(if out.len() > start { Read::More } else { Read::End });
            }
            if out.len() >= limit {
                return Ok(Read::More);
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(Error::Closed);
            };
            if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
                self.buf.reserve(READ_SIZE);
            }
            match stream.poll_read_ready(cx) {
                Poll::Pending => return Ok(if out.len() > start { Read::More } else { Read::Pending }),
                Poll::Ready(Err(e)) => return Err(Error::Io(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = match stream.try_read_buf(&mut self.buf) {
                Ok(n) => n,
                // Readiness was stale; the next turn registers for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Error::Io(e)),
            };
            if n > 0 {
                quickack(stream);
            }
            if n == 0 {
                if matches!(self.framing, Framing::Close) {
                    self.framing = Framing::Done;
                    self.stream = None;
                    continue;
                }
                return Err(Error::Closed);
            }
        }
    }

    /// Moves decoded body bytes from the buffer to `out`, up to `limit` in all.
    fn decode(&mut self, out: &mut BytesMut, limit: usize) -> Result<(), Error> {
        let room = limit.saturating_sub(out.len());
        match &mut self.framing {
            Framing::Length(left) => {
                let n = (*left).min(self.buf.len() as u64).min(room as u64) as usize;
                out.extend_from_slice(&self.buf[..n]);
                self.buf.advance(n);
                *left -= n as u64;
                if *left == 0 {
                    self.framing = Framing::Done;
                }
            }
            Framing::Close => {
                let n = self.buf.len().min(room);
                out.extend_from_slice(&self.buf[..n]);
                self.buf.advance(n);
            }
            Framing::Chunked(c) => {
                let used = c.decode(&self.buf, out, room)?;
                self.buf.advance(used);
                if c.done() {
                    self.framing = Framing::Done;
                }
            }
            Framing::Done => {}
        }
        Ok(())
    }

    /// The connection, when the body was read to its end and it may carry another request.
    pub(crate) fn reusable(&mut self) -> Option<TcpStream> {
        if self.is_done() && self.keep_alive && self.buf.is_empty() {
            self.stream.take()
        } else {
            None
        }
    }
}

/// `Transfer-Encoding: chunked`, decoded incrementally: a chunk's size line,
/// its data and the line ends may be split anywhere between reads.
#[derive(Debug, Default)]
struct Chunked {
    state: State,
    /// Of the current chunk: its size while the size line is read, then what is left of it.
    size: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    /// After the size: extensions (ignored) up to the line end.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final blank line).
    Trailer,
    TrailerLine,
    EndLf,
    Done,
}

impl Chunked {
    fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending at most `room` data bytes to `out`;
    /// returns how much of `input` it used.
    fn decode(&mut self, input: &[u8], out: &mut BytesMut, mut room: usize) -> Result<usize, Error> {
        let bad = |why: &str| Err(Error::Protocol(format!("chunked encoding: {why}")));
        let mut at = 0;
        while at < input.len() && self.state != State::Done {
            if self.state == State::Data {
                if room == 0 {
                    break;
                }
                let n = (self.size.min((input.len() - at) as u64) as usize).min(room);
                out.extend_from_slice(&input[at..at + n]);
                at += n;
                room -= n;
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[at];
            at += 1;
            self.state = match (self.state, b) {
                (State::Size, b) if b.is_ascii_hexdigit() => {
                    let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                    if self.size > (u64::MAX >> 4) {
                        return bad("a chunk size too large");
                    }
                    self.size = (self.size << 4) | digit;
                    State::Size
                }
                (State::Size, b';' | b' ' | b'\t') => State::Ext,
                (State::Size | State::Ext, b'\r') => State::SizeLf,
                (State::Ext, b'\n') => return bad("a bare LF in a chunk extension"),
                (State::Ext, _) => State::Ext,
                (State::SizeLf, b'\n') if self.size == 0 => State::Trailer,
                (State::SizeLf, b'\n') => State::Data,
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataLf, b'\n') => State::Size,
                (State::Trailer, b'\r') => State::EndLf,
                (State::Trailer | State::TrailerLine, b'\n') => State::Trailer,
                (State::Trailer | State::TrailerLine, _) => State::TrailerLine,
                (State::EndLf, b'\n') => State::Done,
                _ => return bad("an invalid chunk size line or chunk end"),
            };
        }
        // At the end, `at` is just past the final LF: what follows belongs to no answer.
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], splits: &[usize]) -> Result<(Vec<u8>, bool, usize), Error> {
        let mut c = Chunked::default();
        let mut out = BytesMut::new();
        let mut used = 0;
        let mut last = 0;
        for &cut in splits.iter().chain(std::iter::once(&input.len())) {
            let mut pending = input[last..cut].to_vec();
            // What one call leaves unused comes again with the next bytes, as the reader's buffer does.
            if used < last {
                let mut head = input[used..last].to_vec();
                head.extend_from_slice(&pending);
                pending = head;
            }
            let from = used;
            let n = c.decode(&pending, &mut out, usize::MAX)?;
            used = from + n;
            last = cut;
            if c.done() {
                break;
            }
        }
        Ok((out.to_vec(), c.done(), used))
    }

    #[test]
    fn chunks_decode_in_any_split() {
        let body = b"5\r\nhello\r\n1;name=value\r\n \r\nB\r\n world, all\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let want = b"hello  world, all".to_vec();
        for cut in 0..body.len() {
            let (got, done, used) = decode_all(body, &[cut]).unwrap();
            assert_eq!(got, want, "cut at {cut}");
            assert!(done, "cut at {cut}");
            assert_eq!(&body[used..], b"NEXT", "cut at {cut}");
        }
        let every: Vec<usize> = (1..body.len()).collect();
        let (got, done, _) = decode_all(body, &every).unwrap();
        assert_eq!((got, done), (want, true));
    }

    #[test]
    fn room_limits_what_one_call_takes() {
        let body = b"a\r\n0123456789\r\n0\r\n\r\n";
        let mut c = Chunked::default();
        let mut out = BytesMut::new();
        let used = c.decode(body, &mut out, 4).unwrap();
        assert_eq!(&out[..], b"0123");
        let used2 = c.decode(&body[used..], &mut out, 100).unwrap();
        assert_eq!(&out[..], b"0123456789");
        assert!(c.done());
        assert_eq!(used + used2, body.len());
    }

    #[test]
    fn broken_framing_is_an_error() {
        for bad in [&b"zz\r\n"[..], b"3\r\nabcX", b"ffffffffffffffffff\r\n", b"3\nabc"] {
            assert!(decode_all(bad, &[]).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}

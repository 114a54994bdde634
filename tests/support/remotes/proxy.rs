//! [`ConnectProxy`]: an HTTP CONNECT proxy written for the tests, proving a client honoured its
//! proxy setting.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// An HTTP CONNECT proxy on a loopback port: tunnels bytes to whatever `host:port` it is asked
/// for and records those targets. Anything but CONNECT gets a 405.
pub struct ConnectProxy {
    pub port: u16,
    targets: Arc<Mutex<Vec<String>>>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy's port");
        let port = listener.local_addr().expect("the proxy's address").port();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(Mutex::new(Vec::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let (t, o, s) = (targets.clone(), open.clone(), stopping.clone());
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let (t, o) = (t.clone(), o.clone());
                    std::thread::spawn(move || tunnel(conn, &t, &o));
                }
            }
        });
        ConnectProxy {
            port,
            targets,
            open,
            stopping,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`, for `http.proxy` or `https_proxy`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `host:port` of every CONNECT received, in order.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().expect("the proxy's target list").clone()
    }
}

/// Serves one proxy connection: reads the request head, opens the tunnel, pumps both ways.
fn tunnel(mut client: TcpStream, targets: &Mutex<Vec<String>>, open: &Mutex<Vec<TcpStream>>) {
    // Byte by byte, so nothing past the head (the tunnel's first bytes) is read here.
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) if head.len() < 16 * 1024 => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if !method.eq_ignore_ascii_case("CONNECT") {
        let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    targets.lock().expect("the proxy's target list").push(target.to_owned());
    let Ok(upstream) = TcpStream::connect(target) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let _ = client.set_read_timeout(None);
    if client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .is_err()
    {
        return;
    }
    let (Ok(client_w), Ok(mut upstream_r)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    if let (Ok(c), Ok(u)) = (client.try_clone(), upstream.try_clone()) {
        open.lock().expect("the proxy's connection list").extend([c, u]);
    }
    let mut upstream_w = upstream;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client, &mut upstream_w);
        let _ = upstream_w.shutdown(Shutdown::Write);
    });
    let mut client_w = client_w;
    let _ = std::io::copy(&mut upstream_r, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Write);
    let _ = up.join();
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees `stopping`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for conn in self
            .open
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default()
        {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

//! A `Write` that hands its bytes, in large chunks and in order, to a writer on another
//! thread. Layers use it so that tar framing and the uncompressed digest run on the calling
//! thread while gzip and the blob's digest run on a second one: the bytes written, and so
//! every digest, are exactly those of writing in place; only the work is spread over two
//! cores (gzip of the ~300 MB codex binary dominates a cold build).

use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

const CHUNK: usize = 1 << 20;

pub(crate) struct Pipe<T> {
    tx: Option<SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
    worker: Option<JoinHandle<io::Result<T>>>,
}

impl<T: Send + 'static> Pipe<T> {
    /// Feed `inner` on a new thread; `finish` runs `done(inner)` there once all is written.
    pub(crate) fn spawn<W, F>(mut inner: W, done: F) -> Pipe<T>
    where
        W: Write + Send + 'static,
        F: FnOnce(W) -> io::Result<T> + Send + 'static,
    {
        // A few chunks in flight: enough to keep both threads busy, little memory.
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let worker = std::thread::spawn(move || {
            for chunk in rx {
                inner.write_all(&chunk)?;
            }
            done(inner)
        });
        Pipe {
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK),
            worker: Some(worker),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let tx = self.tx.as_ref().ok_or_else(|| io::Error::other("write after finish"))?;
        if tx.send(chunk).is_err() {
            // The worker stopped early: its own error says why.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the writer thread stopped")));
        }
        Ok(())
    }

    fn join(&mut self) -> io::Result<T> {
        self.tx = None;
        match self.worker.take() {
            Some(w) => w
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked"))),
            None => Err(io::Error::other("the writer thread was already joined")),
        }
    }

    /// Send what is buffered, wait for the worker, and return what `done` returned.
    pub(crate) fn finish(mut self) -> io::Result<T> {
        self.send()?;
        self.join()
    }
}

impl<T: Send + 'static> Write for Pipe<T> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<T> Drop for Pipe<T> {
    fn drop(&mut self) {
        // Abandoned after an error: let the worker see the end of input and stop.
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_and_done_runs_last() {
        let mut p = Pipe::spawn(Vec::new(), |v: Vec<u8>| Ok(v));
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(4096 + 3) {
            p.write_all(piece).unwrap();
        }
        assert_eq!(p.finish().unwrap(), data);
    }

    #[test]
    fn the_workers_error_is_reported() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut p = Pipe::spawn(Full, |_| Ok(()));
        let mut failed = None;
        for _ in 0..16 {
            if let Err(e) = p.write_all(&[0; CHUNK]) {
                failed = Some(e);
                break;
            }
        }
        let e = match failed {
            Some(e) => e,
            None => p.finish().unwrap_err(),
        };
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
    }
}

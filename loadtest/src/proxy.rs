//! A TCP proxy between one worker and PostgreSQL that can blackhole its traffic.
//!
//! While cut, the proxy stops moving bytes in both directions and holds new connections
//! without connecting them, but closes nothing: to both ends it looks like a network that
//! silently drops packets (a half-open connection), not like a refused or reset one. When it
//! heals, the held bytes flow again, as retransmissions would.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    cut: Arc<watch::Sender<bool>>,
}

impl Proxy {
    pub async fn start(upstream: String) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(watch::channel(false).0);
        let tx = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, rx) = (upstream.clone(), tx.subscribe());
                tokio::spawn(async move {
                    let mut rx2 = rx.clone();
                    healed(&mut rx2).await;
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, rx.clone()), pump(sr, cw, rx));
                });
            }
        });
        Ok(Proxy { port, cut })
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

async fn healed(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|cut| !*cut).await;
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        healed(&mut rx).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read while the cut began are in flight: they arrive after it heals.
        healed(&mut rx).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server behind the proxy: bytes flow, stop while cut (nothing is closed), and
    /// arrive after the heal.
    #[tokio::test]
    async fn a_cut_holds_bytes_without_closing_and_a_heal_delivers_them() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let mut buf = [0u8; 5];
        c.write_all(b"hello").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        proxy.set_cut(true);
        c.write_all(b"later").await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "nothing arrives (and nothing closes) while cut"
        );
        // A new connection is held, not refused.
        let mut held = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        held.write_all(b"again").await.unwrap();

        proxy.set_cut(false);
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"later");
        tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"again");
    }
}

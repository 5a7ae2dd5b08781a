//! A pushing client that misbehaves on purpose, for the chaos tests: it hangs up mid-request,
//! retries at once on the same upload, races its own retries against each other on different
//! nodes, and carries on through server crashes. Whatever happens, it only counts a push as
//! done when the registry answered 201 to the manifest.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use reqwest::blocking::Client;

use super::{location_path, sha256};

/// Small and deterministic: the tests need reproducible variety, not quality randomness.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True about once in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub struct ChaosClient {
    /// `http://127.0.0.1:PORT` of each node; requests pick one at random.
    pub nodes: Vec<String>,
    client: Client,
    rng: Rng,
}

/// A request that did not get an answer (connection refused, reset, timed out).
type Sent = Result<(u16, reqwest::header::HeaderMap), ()>;

impl ChaosClient {
    pub fn new(nodes: Vec<String>, seed: u64) -> ChaosClient {
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        ChaosClient {
            nodes,
            client,
            rng: Rng::new(seed),
        }
    }

    fn node(&mut self) -> String {
        let i = self.rng.below(self.nodes.len());
        self.nodes[i].clone()
    }

    fn send(req: reqwest::blocking::RequestBuilder) -> Sent {
        let resp = req.send().map_err(|_| ())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        resp.bytes().map_err(|_| ())?;
        Ok((status, headers))
    }

    /// Sends the start of a request and hangs up, as a client killed mid-transfer would.
    fn hang_up(&mut self, method: &str, path: &str, extra: &str, body: &[u8]) {
        let node = self.node();
        let host = node.trim_start_matches("http://").to_string();
        let Ok(addr) = host.parse::<SocketAddr>() else {
            return;
        };
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return;
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        );
        let cut = self.rng.below(body.len().max(1)) + 1;
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&body[..cut.min(body.len())]);
    }

    fn patch(&self, node: &str, path: &str, start: usize, bytes: &[u8]) -> Sent {
        Self::send(
            self.client
                .patch(format!("{node}{path}"))
                .header("Content-Type", "application/octet-stream")
                .header(
                    "Content-Range",
                    format!("{start}-{}", start + bytes.len() - 1),
                )
                .body(bytes.to_vec()),
        )
    }

    /// Where the upload at `path` stands, asking any node.
    fn upload_size(&mut self, path: &str) -> Option<usize> {
        let node = self.node();
        let (status, headers) = Self::send(self.client.get(format!("{node}{path}"))).ok()?;
        if status != 204 {
            return None;
        }
        let range = headers.get("range")?.to_str().ok()?;
        let end: usize = range.strip_prefix("0-")?.parse().ok()?;
        Some(if end == 0 { 0 } else { end + 1 })
    }

    /// One attempt at a chunked blob upload with faults; true if the registry answered 201.
    fn try_chunked(&mut self, repo: &str, bytes: &[u8]) -> bool {
        let node = self.node();
        let Ok((202, headers)) = Self::send(
            self.client
                .post(format!("{node}/v2/{repo}/blobs/uploads/"))
                .header("Content-Length", "0"),
        ) else {
            return false;
        };
        let Some(loc) = headers.get("location").and_then(|l| l.to_str().ok()) else {
            return false;
        };
        let path = location_path(loc);
        let half = bytes.len() / 2;
        let (first, last) = bytes.split_at(half);
        if self.rng.one_in(3) {
            self.hang_up("PATCH", &path, "", first);
        }
        if self.rng.one_in(4) {
            // The same chunk sent to two nodes at once: at most one may land.
            let (a, b) = (self.node(), self.node());
            let this = &*self;
            std::thread::scope(|s| {
                let one = s.spawn(|| this.patch(&a, &path, 0, first));
                let two = s.spawn(|| this.patch(&b, &path, 0, first));
                let _ = (one.join(), two.join());
            });
        } else {
            let node = self.node();
            let _ = self.patch(&node, &path, 0, first);
        }
        // Resync as a careful client does: continue from what the registry holds, or give up
        // on this upload if it holds something unexpected (a hung-up request's bytes).
        match self.upload_size(&path) {
            Some(n) if n == half => {}
            Some(0) => {
                let node = self.node();
                if !matches!(self.patch(&node, &path, 0, first), Ok((202, _))) {
                    return false;
                }
            }
            _ => return false,
        }
        let node = self.node();
        let digest = sha256(bytes);
        matches!(
            Self::send(
                self.client
                    .put(format!("{node}{path}?digest={digest}"))
                    .header("Content-Type", "application/octet-stream")
                    .body(last.to_vec()),
            ),
            Ok((201, _))
        )
    }

    /// One attempt at a monolithic blob push, sometimes after a hung-up one.
    fn try_monolithic(&mut self, repo: &str, bytes: &[u8]) -> bool {
        let digest = sha256(bytes);
        let path = format!("/v2/{repo}/blobs/uploads/?digest={digest}");
        if self.rng.one_in(3) {
            self.hang_up("POST", &path, "", bytes);
        }
        let node = self.node();
        matches!(
            Self::send(
                self.client
                    .post(format!("{node}{path}"))
                    .header("Content-Type", "application/octet-stream")
                    .body(bytes.to_vec()),
            ),
            Ok((201, _))
        )
    }

    /// Pushes a config (monolithic) and a layer (chunked), then the manifest under `tag`,
    /// retrying each step through faults and crashes. Returns the manifest's digest.
    pub fn push_image(&mut self, repo: &str, tag: &str, seed: u64) -> String {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
        let mut layer = vec![0u8; 1024 * 1024 + (seed as usize % 4096)];
        let mut r = Rng::new(seed);
        layer.iter_mut().for_each(|b| *b = r.next() as u8);
        self.retry(|c| c.try_monolithic(repo, config.as_bytes()));
        self.retry(|c| c.try_chunked(repo, &layer));
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
            sha256(config.as_bytes()),
            config.len(),
            sha256(&layer),
            layer.len()
        );
        self.retry(|c| {
            let node = c.node();
            matches!(
                Self::send(
                    c.client
                        .put(format!("{node}/v2/{repo}/manifests/{tag}"))
                        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                        .body(manifest.clone()),
                ),
                Ok((201, _))
            )
        });
        sha256(manifest.as_bytes())
    }

    fn retry(&mut self, mut attempt: impl FnMut(&mut ChaosClient) -> bool) {
        for _ in 0..200 {
            if attempt(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("a push step failed 200 times in a row");
    }
}

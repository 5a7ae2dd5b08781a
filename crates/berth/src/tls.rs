//! TLS for the listener: the certificate and key (PEM files), checked when the server starts and
//! reloaded while it runs, and the optional client-certificate check.
//!
//! Certificates are rotated on disk (cert-manager, ACME clients) without telling the process,
//! so [`Tls::reload_until`] reads both files every [`RELOAD_INTERVAL`] and swaps in a new pair
//! once both parse and the key belongs to the certificate. A handshake asks [`CurrentCert`]
//! for the pair, so new connections get the new certificate and open ones keep theirs. A
//! half-written rotation (a new certificate beside the old key) is logged and the old pair
//! kept: the files are compared by content, so the next change is tried again.
//!
//! The provider is aws-lc-rs, which object_store's HTTP client already compiles in; ring stays
//! out of the build.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// How often the certificate and key files are read to see whether they changed.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The ALPN protocols offered, preferred first: HTTP/2 to clients that speak it.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} and {}: not a usable certificate and key: {source}", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("client CA bundle {}: {what}", path.display())]
    ClientCa { path: PathBuf, what: String },
    #[error("TLS settings: {0}")]
    Settings(#[from] rustls::Error),
}

/// The TLS side of the listener: the acceptor handshakes use, and what reloading needs.
/// Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<CurrentCert>,
    files: Arc<TlsConfig>,
    provider: Arc<CryptoProvider>,
    /// The file contents the current pair was made from.
    loaded: Arc<Pem>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// The bytes of the certificate and key files, as last read.
#[derive(PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Tls {
    /// Reads and checks the certificate, the key and the client CA bundle; any problem is an
    /// error naming the file, so a bad setup stops the start.
    pub fn load(files: &TlsConfig) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let pem = read_pair(files)?;
        let pair = certified_key(&pem, files, &provider)?;
        let current = Arc::new(CurrentCert(RwLock::new(Arc::new(pair))));
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => builder.with_client_cert_verifier(client_verifier(path, &provider)?),
        };
        let mut config = builder.with_cert_resolver(current.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
            files: Arc::new(files.clone()),
            provider,
            loaded: Arc::new(pem),
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Background worker: every [`RELOAD_INTERVAL`], reads the certificate and key files and,
    /// when they changed and make a valid pair, serves the new pair to new connections. A bad
    /// pair is logged and the current one kept. Runs until `stop` turns true.
    pub async fn reload_until(self, mut stop: watch::Receiver<bool>) {
        let mut seen = self.loaded.clone();
        let mut failed: Option<String> = None;
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let files = self.files.clone();
            let read = tokio::task::spawn_blocking(move || read_pair(&files)).await;
            let outcome = match read {
                Ok(Ok(pem)) if *seen == pem => continue,
                Ok(Ok(pem)) => {
                    let pem = Arc::new(pem);
                    seen = pem.clone();
                    certified_key(&pem, &self.files, &self.provider)
                }
                Ok(Err(e)) => Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the TLS files failed; will retry");
                    continue;
                }
            };
            match outcome {
                Ok(pair) => {
                    let subject = pair.end_entity_cert().ok().and_then(|c| common_name(c));
                    self.current.replace(Arc::new(pair));
                    failed = None;
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        subject = subject.as_deref().unwrap_or(""),
                        "TLS certificate reloaded; new connections get it"
                    );
                }
                Err(e) => {
                    // Logged once per bad state, not every few seconds while it lasts.
                    let message = e.to_string();
                    if failed.as_ref() != Some(&message) {
                        tracing::warn!(error = %message, "new TLS certificate not used; still serving the previous one");
                        failed = Some(message);
                    }
                }
            }
        }
    }
}

/// The certificate handshakes get; replaced whole when the files change.
#[derive(Debug)]
pub struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    fn replace(&self, pair: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = pair;
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_pair(files: &TlsConfig) -> Result<Pem, TlsError> {
    Ok(Pem {
        cert: read(&files.cert)?,
        key: read(&files.key)?,
    })
}

/// The chain in the certificate file (end entity first) with the key, which must be the
/// certificate's.
fn certified_key(
    pem: &Pem,
    files: &TlsConfig,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let pem_error = |path: &Path, what| {
        let path = path.to_path_buf();
        move |source| TlsError::Pem { path, what, source }
    };
    let chain = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(&files.cert, "not a PEM certificate chain"))?;
    if chain.is_empty() {
        return Err(pem_error(&files.cert, "no PEM certificate in it")(
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key)
        .map_err(pem_error(&files.key, "no PEM private key in it"))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })
}

/// Client certificates are optional: a client without one is served as before (access control
/// decides what it may do), and one that presents a certificate must present one that chains
/// to the bundle, or the handshake fails.
fn client_verifier(
    path: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let failed = |what: String| TlsError::ClientCa {
        path: path.to_path_buf(),
        what,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(path)?) {
        let cert = cert.map_err(|e| failed(format!("not a PEM certificate bundle: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| failed(format!("not a CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(failed("no PEM certificate in it".into()));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| failed(e.to_string()))
}

/// The subject Common Name of a DER certificate, when the subject has exactly one and it is a
/// string without control characters. The certificate was verified by the handshake; this only
/// reads it, with a minimal DER walk instead of a full X.509 parser's dependencies.
pub fn common_name(cert: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    let mut certificate = Der(cert).read(SEQUENCE)?;
    let mut tbs = certificate.read(SEQUENCE)?;
    if tbs.0.first() == Some(&0xa0) {
        tbs.read(0xa0)?; // [0] version
    }
    tbs.read(0x02)?; // serialNumber
    tbs.read(SEQUENCE)?; // signature algorithm
    tbs.read(SEQUENCE)?; // issuer
    tbs.read(SEQUENCE)?; // validity
    let mut subject = tbs.read(SEQUENCE)?;
    let mut found = None;
    while !subject.0.is_empty() {
        let mut rdn = subject.read(SET)?;
        while !rdn.0.is_empty() {
            let mut attribute = rdn.read(SEQUENCE)?;
            let oid = attribute.read(OID)?;
            let (tag, value) = attribute.read_any()?;
            if oid.0 == COMMON_NAME {
                if found.is_some() {
                    return None;
                }
                found = Some(directory_string(tag, value.0)?);
            }
        }
    }
    found.filter(|cn: &String| !cn.is_empty() && !cn.chars().any(char::is_control))
}

/// A DirectoryString's text: UTF8String, PrintableString, IA5String or BMPString.
fn directory_string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        0x0c | 0x13 | 0x16 => String::from_utf8(bytes.to_vec()).ok(),
        0x1e if bytes.len().is_multiple_of(2) => char::decode_utf16(
            bytes
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]])),
        )
        .collect::<Result<String, _>>()
        .ok(),
        _ => None,
    }
}

/// The unread rest of a DER encoding.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next element, whatever its tag: (tag, contents). Only the forms a certificate's
    /// name uses: one-byte tags and definite lengths of up to four bytes.
    fn read_any(&mut self) -> Option<(u8, Der<'a>)> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = match first {
            0..=0x7f => (usize::from(first), rest),
            0x81..=0x84 => {
                let n = usize::from(first & 0x7f);
                let bytes = rest.get(..n)?;
                let len = bytes.iter().fold(0usize, |l, &b| (l << 8) | usize::from(b));
                (len, &rest[n..])
            }
            _ => return None,
        };
        if tag & 0x1f == 0x1f || len > rest.len() {
            return None;
        }
        let (contents, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, Der(contents)))
    }

    /// The next element, which must have tag `tag`.
    fn read(&mut self, tag: u8) -> Option<Der<'a>> {
        match self.read_any()? {
            (t, contents) if t == tag => Some(contents),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};

    fn cert_with(subject: &[(DnType, DnValue)]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        for (ty, value) in subject {
            name.push(ty.clone(), value.clone());
        }
        params.distinguished_name = name;
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("{e}"))
            .der()
            .to_vec()
    }

    #[test]
    fn common_name_of_a_certificate_subject() {
        let utf8 = |s: &str| DnValue::Utf8String(s.into());
        let printable =
            |s: &str| DnValue::PrintableString(s.try_into().unwrap_or_else(|e| panic!("{e:?}")));
        let cases: Vec<(Vec<(DnType, DnValue)>, Option<&str>)> = vec![
            (
                vec![(DnType::CommonName, utf8("ci-robot"))],
                Some("ci-robot"),
            ),
            (
                vec![
                    (DnType::OrganizationName, utf8("Acme")),
                    (DnType::CommonName, printable("team a")),
                ],
                Some("team a"),
            ),
            (vec![(DnType::CommonName, utf8("zoë"))], Some("zoë")),
            (
                vec![(
                    DnType::CommonName,
                    DnValue::BmpString("bmp".try_into().unwrap_or_else(|e| panic!("{e:?}"))),
                )],
                Some("bmp"),
            ),
            (vec![(DnType::OrganizationName, utf8("Acme"))], None),
            (vec![], None),
            (vec![(DnType::CommonName, utf8("a\nb"))], None),
            (vec![(DnType::CommonName, utf8(""))], None),
        ];
        for (subject, expected) in cases {
            let der = cert_with(&subject);
            assert_eq!(common_name(&der).as_deref(), expected, "{subject:?}");
        }
    }

    #[test]
    fn two_common_names_are_none() {
        let der = cert_with(&[
            (DnType::CommonName, DnValue::Utf8String("aa".into())),
            (DnType::OrganizationName, DnValue::Utf8String("bb".into())),
        ]);
        assert_eq!(common_name(&der).as_deref(), Some("aa"));
        // The subject's (the last) organization OID (2.5.4.10) turned into the common name's
        // (2.5.4.3): same
        // length, so the DER stays well-formed (the signature no longer matters here).
        let organization = [0x06, 0x03, 0x55, 0x04, 0x0a];
        let at = der
            .windows(5)
            .rposition(|w| w == organization)
            .unwrap_or_else(|| panic!("no organization in the subject"));
        let mut twice = der.clone();
        twice[at + 4] = 0x03;
        assert_eq!(common_name(&twice), None);
    }

    #[test]
    fn common_name_of_garbage_is_none() {
        let der = cert_with(&[(DnType::CommonName, DnValue::Utf8String("x".into()))]);
        for cut in [0, 1, 2, 10, der.len() / 2, der.len() - 1] {
            // Truncated: the outer length no longer fits.
            assert_eq!(common_name(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(common_name(&[0x30, 0x80, 0, 0]), None, "indefinite length");
        assert_eq!(
            common_name(&[0x30, 0x85, 1, 1, 1, 1, 1]),
            None,
            "5-byte length"
        );
        assert_eq!(common_name(b"not DER at all"), None);
    }
}

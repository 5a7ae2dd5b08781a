//! Helpers for the tests that drive real container tools against berth: skopeo, buildah,
//! podman and umoci (Debian packages). Each [`Tools`] has its own scratch directory holding HOME,
//! XDG dirs, TMPDIR, containers-storage (vfs driver), a registries.conf, a policy.json and an
//! auth file, so tests never touch the machine's container state nor each other's.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest any single tool invocation may take before the test fails.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Tools {
    _tmp: tempfile::TempDir,
    /// Scratch directory for the test's own files (layouts, `dir:` targets, inputs).
    pub dir: PathBuf,
    root: PathBuf,
    runroot: PathBuf,
    policy: PathBuf,
    envs: Vec<(String, PathBuf)>,
}

/// Output of a successful tool run.
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
}

impl Tools {
    pub fn new() -> Tools {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().to_path_buf();
        let mk = |p: &str| {
            let d = base.join(p);
            std::fs::create_dir_all(&d).expect("mkdir");
            d
        };
        let home = mk("home");
        let xdg_runtime = mk("xdg-runtime");
        let xdg_config = mk("home/.config");
        let xdg_data = mk("home/.local/share");
        let tmpdir = mk("tmp");
        let root = mk("storage/root");
        let runroot = mk("storage/runroot");
        let dir = mk("work");
        let conf = mk("conf");

        let registries = conf.join("registries.conf");
        std::fs::write(
            &registries,
            "unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n",
        )
        .expect("write registries.conf");
        let policy = conf.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write policy.json");
        let auth = conf.join("auth.json");
        std::fs::write(&auth, r#"{"auths":{}}"#).expect("write auth.json");
        let storage = conf.join("storage.conf");
        std::fs::write(
            &storage,
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                root.display(),
                runroot.display()
            ),
        )
        .expect("write storage.conf");
        let containers_conf = conf.join("containers.conf");
        std::fs::write(
            &containers_conf,
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n",
        )
        .expect("write containers.conf");

        let envs = vec![
            ("HOME".to_string(), home),
            ("XDG_RUNTIME_DIR".to_string(), xdg_runtime),
            ("XDG_CONFIG_HOME".to_string(), xdg_config),
            ("XDG_DATA_HOME".to_string(), xdg_data),
            ("TMPDIR".to_string(), tmpdir),
            ("CONTAINERS_REGISTRIES_CONF".to_string(), registries),
            ("CONTAINERS_STORAGE_CONF".to_string(), storage),
            ("CONTAINERS_CONF".to_string(), containers_conf),
            ("REGISTRY_AUTH_FILE".to_string(), auth),
        ];
        Tools {
            _tmp: tmp,
            dir,
            root,
            runroot,
            policy,
            envs,
        }
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs a program with this sandbox's environment; panics (with its output) unless it exits 0.
    pub fn run(&self, program: &str, args: &[String]) -> Ran {
        match self.try_run(program, args) {
            Ok(r) => r,
            Err(msg) => panic!("{msg}"),
        }
    }

    /// Like [`Tools::run`] but returns a description of the failure instead of panicking.
    pub fn try_run(&self, program: &str, args: &[String]) -> Result<Ran, String> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let shown = format!("{program} {}", args.join(" "));
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!(
                    "`{program}` is not installed (apt-get install {program}); needed for: {shown}"
                )
            }
            Err(e) => panic!("spawning {shown}: {e}"),
        };
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let t_out = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = out.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let t_err = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let deadline = Instant::now() + TOOL_TIMEOUT;
        let status = loop {
            match child.try_wait().expect("try_wait") {
                Some(s) => break Some(s),
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let stdout = t_out.join().unwrap_or_default();
        let stderr = t_err.join().unwrap_or_default();
        match status {
            Some(s) if s.success() => Ok(Ran { stdout, stderr }),
            Some(s) => Err(format!(
                "`{shown}` failed ({s})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            )),
            None => Err(format!(
                "`{shown}` timed out after {TOOL_TIMEOUT:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            )),
        }
    }

    /// `skopeo --policy <ours> ARGS`; returns stdout.
    pub fn skopeo(&self, args: &[&str]) -> String {
        self.run("skopeo", &self.skopeo_args(args)).stdout
    }

    pub fn try_skopeo(&self, args: &[&str]) -> Result<Ran, String> {
        self.try_run("skopeo", &self.skopeo_args(args))
    }

    fn skopeo_args(&self, args: &[&str]) -> Vec<String> {
        let mut v = vec!["--policy".to_string(), self.policy.display().to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// `buildah --root R --runroot RR --storage-driver vfs ARGS`; returns stdout.
    pub fn buildah(&self, args: &[&str]) -> String {
        let mut v = self.storage_args();
        v.extend(args.iter().map(|s| s.to_string()));
        self.run("buildah", &v).stdout
    }

    /// `podman --root R --runroot RR --storage-driver vfs ... ARGS`; returns stdout.
    pub fn podman(&self, args: &[&str]) -> String {
        let mut v = self.storage_args();
        v.extend(
            [
                "--tmpdir",
                &self.runroot.join("libpod-tmp").display().to_string(),
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        v.extend(args.iter().map(|s| s.to_string()));
        self.run("podman", &v).stdout
    }

    pub fn umoci(&self, args: &[&str]) -> String {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.run("umoci", &v).stdout
    }

    fn storage_args(&self) -> Vec<String> {
        vec![
            "--root".to_string(),
            self.root.display().to_string(),
            "--runroot".to_string(),
            self.runroot.display().to_string(),
            "--storage-driver".to_string(),
            "vfs".to_string(),
        ]
    }

    /// Builds an image with umoci into the OCI layout `<scratch>/<layout_name>` under tag `tag`:
    /// one `umoci repack` per entry of `layers`, each writing its files (path relative to the
    /// rootfs, contents) into a fresh unpack of the previous state. Returns the layout.
    pub fn umoci_image(
        &self,
        layout_name: &str,
        tag: &str,
        layers: &[Vec<(&str, Vec<u8>)>],
    ) -> OciLayout {
        let layout = self.path(layout_name);
        let image = format!("{}:{tag}", layout.display());
        if !layout.join("index.json").exists() {
            self.umoci(&["init", "--layout", &layout.display().to_string()]);
        }
        self.umoci(&["new", "--image", &image]);
        for (i, files) in layers.iter().enumerate() {
            let bundle = self.path(&format!("bundle-{layout_name}-{tag}-{i}"));
            self.umoci(&[
                "unpack",
                "--rootless",
                "--image",
                &image,
                &bundle.display().to_string(),
            ]);
            for (rel, bytes) in files {
                let p = bundle.join("rootfs").join(rel);
                std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir in rootfs");
                std::fs::write(&p, bytes).expect("write rootfs file");
            }
            self.umoci(&["repack", "--image", &image, &bundle.display().to_string()]);
            std::fs::remove_dir_all(&bundle).expect("rm bundle");
        }
        self.umoci(&["gc", "--layout", &layout.display().to_string()]);
        OciLayout { path: layout }
    }
}

/// Deterministic pseudo-random bytes (splitmix64), so test inputs are reproducible.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill_pseudo_random(&mut SplitMix(seed), &mut out);
    out
}

pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Fills `buf` with the generator's next bytes (8 at a time; a tail shorter than 8 takes the
/// first bytes of one more draw).
pub fn fill_pseudo_random(rng: &mut SplitMix, buf: &mut [u8]) {
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let v = rng.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }
}

/// An OCI image layout directory on disk.
pub struct OciLayout {
    pub path: PathBuf,
}

impl OciLayout {
    pub fn new(path: impl Into<PathBuf>) -> OciLayout {
        OciLayout { path: path.into() }
    }

    /// `oci:PATH:TAG` for skopeo.
    pub fn reference(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.path.display())
    }

    pub fn index(&self) -> Value {
        let text = std::fs::read(self.path.join("index.json")).expect("read index.json");
        serde_json::from_slice(&text).expect("index.json is JSON")
    }

    /// The descriptor in index.json whose ref.name annotation is `tag`.
    pub fn descriptor(&self, tag: &str) -> Value {
        let index = self.index();
        index["manifests"]
            .as_array()
            .expect("index.json manifests")
            .iter()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap_or_else(|| panic!("no {tag:?} in {}", index))
            .clone()
    }

    pub fn manifest_digest(&self, tag: &str) -> String {
        self.descriptor(tag)["digest"]
            .as_str()
            .expect("digest")
            .to_string()
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').expect("digest has ':'");
        self.path.join("blobs").join(alg).join(hex)
    }

    pub fn blob(&self, digest: &str) -> Vec<u8> {
        std::fs::read(self.blob_path(digest))
            .unwrap_or_else(|e| panic!("blob {digest} in {}: {e}", self.path.display()))
    }

    pub fn json(&self, digest: &str) -> Value {
        serde_json::from_slice(&self.blob(digest)).expect("blob is JSON")
    }

    /// Every digest reachable from `digest` (itself first, then config and layers; an index's
    /// children recursively).
    pub fn closure(&self, digest: &str) -> Vec<String> {
        let mut out = vec![digest.to_string()];
        let v = self.json(digest);
        if let Some(children) = v["manifests"].as_array() {
            for c in children {
                out.extend(self.closure(c["digest"].as_str().expect("child digest")));
            }
        } else {
            out.push(
                v["config"]["digest"]
                    .as_str()
                    .expect("config digest")
                    .to_string(),
            );
            for l in v["layers"].as_array().expect("layers") {
                out.push(l["digest"].as_str().expect("layer digest").to_string());
            }
        }
        out
    }
}

/// Reads a skopeo `dir:` target: `manifest.json` plus blobs named by their hex digest.
pub struct DirImage {
    pub path: PathBuf,
}

impl DirImage {
    pub fn new(path: impl Into<PathBuf>) -> DirImage {
        DirImage { path: path.into() }
    }

    pub fn reference(&self) -> String {
        format!("dir:{}", self.path.display())
    }

    pub fn manifest(&self) -> Vec<u8> {
        std::fs::read(self.path.join("manifest.json")).expect("read dir: manifest.json")
    }

    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.split_once(':').expect("digest has ':'").1;
        std::fs::read(self.path.join(hex))
            .unwrap_or_else(|e| panic!("blob {digest} in {}: {e}", self.path.display()))
    }

    /// With `skopeo copy --all`, each instance of a list is stored as `<hex>.manifest.json`.
    pub fn instance_manifest(&self, digest: &str) -> Vec<u8> {
        let hex = digest.split_once(':').expect("digest has ':'").1;
        let p = self.path.join(format!("{hex}.manifest.json"));
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The names of the files in the directory, sorted.
    pub fn files(&self) -> Vec<String> {
        list_dir(&self.path)
    }
}

pub fn list_dir(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// A deterministic pseudo-random byte stream of `len` bytes that can be told to stall after
/// `stall_after` bytes and to fail once `abort` is set. The bytes do not depend on read sizes.
pub struct GenReader {
    rng: SplitMix,
    block: Vec<u8>,
    pos: usize,
    remaining: u64,
    produced: Arc<AtomicU64>,
    stall_after: u64,
    abort: Arc<AtomicBool>,
    every: u64,
    delay: Duration,
    since_sleep: u64,
}

impl GenReader {
    pub fn new(seed: u64, len: u64) -> GenReader {
        GenReader {
            rng: SplitMix(seed),
            block: vec![0; 64 * 1024],
            pos: 64 * 1024,
            remaining: len,
            produced: Arc::new(AtomicU64::new(0)),
            stall_after: u64::MAX,
            abort: Arc::new(AtomicBool::new(false)),
            every: u64::MAX,
            delay: Duration::ZERO,
            since_sleep: 0,
        }
    }

    /// Slows the stream down: sleeps `delay` after every `every` bytes.
    pub fn throttle(mut self, every: u64, delay: Duration) -> GenReader {
        self.every = every;
        self.delay = delay;
        self
    }

    pub fn stall_after(mut self, n: u64) -> GenReader {
        self.stall_after = n;
        self
    }

    pub fn produced(&self) -> Arc<AtomicU64> {
        self.produced.clone()
    }

    pub fn abort_flag(&self) -> Arc<AtomicBool> {
        self.abort.clone()
    }
}

impl Read for GenReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let aborted = || std::io::Error::other("generator aborted by the test");
        if self.abort.load(Ordering::SeqCst) {
            return Err(aborted());
        }
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let produced = self.produced.load(Ordering::SeqCst);
        if produced >= self.stall_after {
            while !self.abort.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            return Err(aborted());
        }
        if self.since_sleep >= self.every {
            std::thread::sleep(self.delay);
            self.since_sleep = 0;
        }
        if self.pos == self.block.len() {
            fill_pseudo_random(&mut self.rng, &mut self.block);
            self.pos = 0;
        }
        let n = buf
            .len()
            .min(usize::try_from(self.every - self.since_sleep).unwrap_or(usize::MAX))
            .min(self.block.len() - self.pos)
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX))
            .min(usize::try_from(self.stall_after - produced).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        self.remaining -= n as u64;
        self.since_sleep += n as u64;
        self.produced.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
}

/// `sha256:<hex>` and length of everything a reader yields.
pub fn digest_of(mut r: impl Read) -> (String, u64) {
    let mut h = oci::Hasher::new(oci::Algorithm::Sha256);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    (h.finish().to_string(), total)
}

// ---------------------------------------------------------------------------------------------
// containerd: a private daemon per test, driven with `ctr`.
// ---------------------------------------------------------------------------------------------

static BYTES_RUNS: AtomicU64 = AtomicU64::new(0);

impl Tools {
    /// Like [`Tools::run`], for programs whose stdout is binary (`ctr content get`): returns it
    /// byte for byte instead of as text.
    pub fn run_bytes(&self, program: &str, args: &[String]) -> Vec<u8> {
        let n = BYTES_RUNS.fetch_add(1, Ordering::SeqCst);
        let out_path = self.dir.join(format!(".stdout-{n}"));
        let out = std::fs::File::create(&out_path).expect("create stdout file");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let shown = format!("{program} {}", args.join(" "));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
        let mut err = child.stderr.take().expect("stderr");
        let t_err = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let deadline = Instant::now() + TOOL_TIMEOUT;
        let status = loop {
            match child.try_wait().expect("try_wait") {
                Some(s) => break Some(s),
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let stderr = t_err.join().unwrap_or_default();
        match status {
            Some(s) if s.success() => {}
            Some(s) => panic!("`{shown}` failed ({s})\n--- stderr ---\n{stderr}"),
            None => panic!("`{shown}` timed out after {TOOL_TIMEOUT:?}\n--- stderr ---\n{stderr}"),
        }
        let bytes = std::fs::read(&out_path).expect("read stdout file");
        let _ = std::fs::remove_file(&out_path);
        bytes
    }
}

/// A private `containerd` daemon (Debian's `containerd` package) for one test: root, state,
/// temp and `opt` directories, the gRPC socket and the log all live in its own scratch directory,
/// so it never touches the machine's containerd (if any) nor another test's. The CRI plugin (which
/// wants CNI and cgroups) and the snapshotters that only probe the host are disabled; pulls use
/// the `native` snapshotter (plain directories). Content is not shared between namespaces, so
/// each namespace really fetches what it pulls. The daemon is stopped when this is dropped.
pub struct Containerd {
    child: Option<std::process::Child>,
    /// The gRPC socket, for `ctr --address`.
    pub address: PathBuf,
    /// containerd's `root` directory.
    pub root: PathBuf,
    log: PathBuf,
    tools: Tools,
}

impl Containerd {
    pub fn start() -> Containerd {
        let tools = Tools::new();
        let base = tools.path("containerd");
        let mk = |p: &str| {
            let d = base.join(p);
            std::fs::create_dir_all(&d).expect("mkdir");
            d
        };
        let root = mk("root");
        let state = mk("state");
        let temp = mk("tmp");
        let opt = mk("opt");
        let address = base.join("containerd.sock");
        assert!(
            address.as_os_str().len() < 100,
            "socket path too long for a unix socket: {}",
            address.display()
        );
        let config = base.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
temp = "{temp}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{address}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"#,
                root = root.display(),
                state = state.display(),
                temp = temp.display(),
                address = address.display(),
                opt = opt.display(),
            ),
        )
        .expect("write containerd config.toml");
        let log = base.join("containerd.log");
        let log_file = std::fs::File::create(&log).expect("create containerd.log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config)
            .arg("--log-level")
            .arg("info")
            .current_dir(&base)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file);
        for (k, v) in &tools.envs {
            cmd.env(k, v);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("`containerd` is not installed (apt-get install containerd)")
            }
            Err(e) => panic!("spawning containerd: {e}"),
        };
        let mut c = Containerd {
            child: Some(child),
            address,
            root,
            log,
            tools,
        };
        c.wait_ready();
        c
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                panic!(
                    "containerd exited ({status}) before serving\n--- containerd log ---\n{}",
                    self.log()
                );
            }
            if self.address.exists() && self.try_ctr("default", &["version"]).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not serve {} within 60s\n--- containerd log ---\n{}",
                    self.address.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn ctr_args(&self, namespace: &str, args: &[&str]) -> Vec<String> {
        let mut v = vec![
            "--address".to_string(),
            self.address.display().to_string(),
            "--namespace".to_string(),
            namespace.to_string(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// `ctr --address SOCK --namespace NS ARGS`; returns stdout, panics (with the daemon's log)
    /// unless it exits 0.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> String {
        match self.try_ctr(namespace, args) {
            Ok(r) => r.stdout,
            Err(e) => panic!("{e}\n--- containerd log ---\n{}", self.log()),
        }
    }

    pub fn try_ctr(&self, namespace: &str, args: &[&str]) -> Result<Ran, String> {
        self.tools.try_run("ctr", &self.ctr_args(namespace, args))
    }

    /// `ctr content get DIGEST`: the bytes of a blob in the namespace's content store.
    pub fn content(&self, namespace: &str, digest: &str) -> Vec<u8> {
        self.tools.run_bytes(
            "ctr",
            &self.ctr_args(namespace, &["content", "get", digest]),
        )
    }

    /// `ctr content ls -q`, sorted.
    pub fn content_digests(&self, namespace: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .ctr(namespace, &["content", "ls", "-q"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    /// `ctr images ls`, as (REF, TYPE, DIGEST) rows.
    pub fn images(&self, namespace: &str) -> Vec<(String, String, String)> {
        self.ctr(namespace, &["images", "ls"])
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert!(f.len() >= 3, "unexpected `ctr images ls` row: {l:?}");
                (f[0].to_string(), f[1].to_string(), f[2].to_string())
            })
            .collect()
    }

    /// `ctr snapshots --snapshotter native ls`, as (KEY, PARENT, KIND) rows; PARENT is empty for a
    /// base layer.
    pub fn native_snapshots(&self, namespace: &str) -> Vec<(String, String, String)> {
        self.ctr(namespace, &["snapshots", "--snapshotter", "native", "ls"])
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [key, kind] => (key.to_string(), String::new(), kind.to_string()),
                    [key, parent, kind] => (key.to_string(), parent.to_string(), kind.to_string()),
                    _ => panic!("unexpected `ctr snapshots ls` row: {l:?}"),
                }
            })
            .collect()
    }

    /// The native snapshotter's snapshot directories (each a complete root filesystem: the
    /// native snapshotter copies the parent into every child).
    pub fn native_snapshot_dirs(&self) -> Vec<PathBuf> {
        let dir = self
            .root
            .join("io.containerd.snapshotter.v1.native/snapshots");
        list_dir(&dir).into_iter().map(|n| dir.join(n)).collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

//! amqps:// for real: socat terminates TLS in front of the local RabbitMQ with certificates
//! this test makes with openssl (a private CA, a server certificate for 127.0.0.1, a client
//! certificate, and a second, unrelated CA). The worker trusts the private CA through
//! `amqp.tls_ca_file` and draws; with the wrong CA it says it is a certificate problem; when
//! the proxy requires a client certificate, the worker without one is refused and with
//! `amqp.tls_cert_file` / `tls_key_file` it is served. socat and openssl come from .ci/run.

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is openssl installed? .ci/run installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA (`<name>-ca.pem`, `<name>-ca.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    run(Command::new("openssl")
        .current_dir(dir)
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.pem"),
        ])
        .args(["-subj", &format!("/CN=rewardpool test CA {name}")])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]));
}

/// Makes `<leaf>.pem` / `<leaf>.key` (PKCS#8) signed by CA `ca`, with `ext` (v3 extensions).
fn make_leaf(dir: &Path, ca: &str, leaf: &str, ext: &str) {
    std::fs::write(dir.join(format!("{leaf}.ext")), ext).unwrap();
    run(Command::new("openssl")
        .current_dir(dir)
        .args(["req", "-newkey", "rsa:2048", "-nodes"])
        .args([
            "-keyout",
            &format!("{leaf}.key"),
            "-out",
            &format!("{leaf}.csr"),
        ])
        .args(["-subj", &format!("/CN={leaf}")]));
    run(Command::new("openssl")
        .current_dir(dir)
        .args(["x509", "-req", "-in", &format!("{leaf}.csr"), "-days", "2"])
        .args([
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
        ])
        .args(["-CAcreateserial", "-out", &format!("{leaf}.pem")])
        .args(["-extfile", &format!("{leaf}.ext")]));
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        make_ca(dir.path(), "good");
        make_ca(dir.path(), "wrong");
        make_leaf(
            dir.path(),
            "good",
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        );
        make_leaf(
            dir.path(),
            "good",
            "client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        );
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// socat terminating TLS on a free local port, forwarding to RabbitMQ on 5672.
struct Proxy {
    child: Child,
    port: u16,
}

impl Proxy {
    fn start(pki: &Pki, require_client_cert: bool) -> Proxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={},verify={}",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            pki.path("good-ca.pem").display(),
            u8::from(require_client_cert),
        );
        let child = Command::new("socat")
            .args([listen.as_str(), "TCP:127.0.0.1:5672"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat (is socat installed? .ci/run installs it)");
        // Dropped (socat killed) also when it never listens.
        let proxy = Proxy { child, port };
        // Ready once it accepts a TCP connection.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("socat did not listen on {port}");
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn setup(test: &str, tls: &[(&str, PathBuf)]) -> Setup {
    let mut config = WorkerConfig::new(QueueType::Classic, stream_pools());
    for (key, path) in tls {
        config
            .amqp_extra
            .push(format!("{key} = {:?}", path.to_str().unwrap()));
    }
    Setup::new(test, config)
}

/// The worker is served through the proxy: three requests drawn.
async fn serves(setup: &Setup, proxy: &Proxy) {
    let conn = require_broker().await;
    let url = proxy.url();
    let mut worker = setup
        .start_ready(&conn, &[("REWARDPOOL__AMQP__URL", &url)])
        .await;
    let results = Collector::start(&setup.names.result).await;
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &setup.names.request, None, 0..3).await;
    results
        .wait_for("3 results over TLS", Duration::from_secs(60), |m| {
            distinct_count(m) >= 3
        })
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    drop(results);
    setup.names.delete(&conn).await;
}

/// The worker is refused: it logs `says` (an ERROR that names the problem), does not consume,
/// and keeps retrying.
async fn refused(setup: &Setup, proxy: &Proxy, says: &str) {
    let url = proxy.url();
    let mut worker = setup.start_worker(&[("REWARDPOOL__AMQP__URL", &url)]);
    wait_until(
        "the refusal in the log",
        Duration::from_secs(60),
        async || worker.log().contains(says),
    )
    .await;
    worker.assert_running();
    let log = worker.log();
    assert!(log.contains("ERROR"), "{log}");
    assert!(!log.contains("connected; consuming"), "{log}");
    let line = log.lines().find(|l| l.contains(says)).unwrap_or_default();
    note(format!("refused: {line}"));
    worker.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_serves_and_a_wrong_ca_is_a_certificate_problem() {
    let pki = Pki::new();
    let proxy = Proxy::start(&pki, false);
    let good = setup("tls-ca", &[("tls_ca_file", pki.path("good-ca.pem"))]);
    serves(&good, &proxy).await;
    let wrong = setup("tls-wrong", &[("tls_ca_file", pki.path("wrong-ca.pem"))]);
    refused(&wrong, &proxy, "TLS certificate problem").await;
    // Without any CA file the built-in roots do not know the private CA either.
    let none = setup("tls-none", &[]);
    refused(&none, &proxy, "TLS certificate problem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_configured() {
    let pki = Pki::new();
    let proxy = Proxy::start(&pki, true);
    let without = setup("tls-nocert", &[("tls_ca_file", pki.path("good-ca.pem"))]);
    refused(&without, &proxy, "TLS certificate problem").await;
    let with = setup(
        "tls-cert",
        &[
            ("tls_ca_file", pki.path("good-ca.pem")),
            ("tls_cert_file", pki.path("client.pem")),
            ("tls_key_file", pki.path("client.key")),
        ],
    );
    serves(&with, &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_tls_file_stops_the_worker_naming_the_key() {
    let missing = std::env::temp_dir().join("rewardpool-no-such-ca.pem");
    let setup = setup("tls-missing", &[("tls_ca_file", missing.clone())]);
    let mut worker = setup.start_worker(&[]);
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    let log = worker.log();
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains("amqp.tls_ca_file") && log.contains(missing.to_str().unwrap()),
        "{log}"
    );
}

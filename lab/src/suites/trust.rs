//! The rendezvous link seen from the wire (issue #23): the packets between
//! the NATs and the rendezvous, captured in the rendezvous host, must hold
//! neither the network token nor any of the protocol's JSON once the link
//! is https. The same capture over plain http first must show the token:
//! that proves the capture sees what the daemons send, so an empty search
//! means encryption and not a capture that missed everything.
//!
//! The https run also pins the server's order-signing key in both daemons
//! and still has to end direct: signed orders verified across two real
//! NATs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::harness::punchd_types::PathState;
use crate::harness::{Binaries, Expect, Run, Scenario};
use crate::net::nat::NatBehaviour;
use crate::net::topology::{Layout, RENDEZVOUS_IP};

/// The network token both phases use; what must not be seen in clear.
const TOKEN: &str = "lab-trust-token-5d2e8b";

/// What a capture of the rendezvous link contained.
#[derive(Debug)]
pub struct Seen {
    /// Bytes captured.
    pub bytes: usize,
    /// The token appears, in the bytes or in unmasked WebSocket frames.
    pub token: bool,
    /// A protocol JSON key appears (`"type":`, `"nonce"`, `"signature"`),
    /// in the bytes or in unmasked WebSocket frames.
    pub json: bool,
}

fn seen(pcap: &Path) -> Result<Seen> {
    let data = std::fs::read(pcap).with_context(|| format!("read {}", pcap.display()))?;
    let readable = observable(&data);
    let has = |needle: &[u8]| readable.windows(needle.len()).any(|w| w == needle);
    Ok(Seen {
        bytes: data.len(),
        token: has(TOKEN.as_bytes()),
        json: has(b"\"type\":") || has(b"\"nonce\"") || has(b"\"signature\""),
    })
}

/// Everything a passive observer reads from a capture of the link: each
/// TCP payload as sent, plus the client's WebSocket frames unmasked
/// (clients XOR their frames with a key sent right before them, which
/// hides nothing but would hide the token from a plain byte search).
/// Pure, over the pcap bytes (Linux cooked v2 link type, IPv4).
fn observable(pcap: &[u8]) -> Vec<u8> {
    use std::collections::BTreeMap;
    let mut out = Vec::new();
    // Client → server byte stream per source, in sequence order.
    let mut upstream: BTreeMap<([u8; 4], u16), (u32, Vec<u8>)> = BTreeMap::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let len =
            u32::from_le_bytes([pcap[at + 8], pcap[at + 9], pcap[at + 10], pcap[at + 11]]) as usize;
        let Some(frame) = pcap.get(at + 16..at + 16 + len) else {
            break;
        };
        at += 16 + len;
        let Some(ip) = frame.get(20..).filter(|ip| ip.len() >= 20 && ip[9] == 6) else {
            continue;
        };
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let Some(tcp) = ip.get(usize::from(ip[0] & 0x0f) * 4..total) else {
            continue;
        };
        if tcp.len() < 20 {
            continue;
        }
        let Some(payload) = tcp.get(usize::from(tcp[12] >> 4) * 4..) else {
            continue;
        };
        if payload.is_empty() {
            continue;
        }
        out.extend_from_slice(payload);
        if u16::from_be_bytes([tcp[2], tcp[3]]) == 8080 {
            let src = (
                [ip[12], ip[13], ip[14], ip[15]],
                u16::from_be_bytes([tcp[0], tcp[1]]),
            );
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            let (next, bytes) = upstream.entry(src).or_insert((seq, Vec::new()));
            if seq == *next {
                bytes.extend_from_slice(payload);
                *next = seq.wrapping_add(payload.len() as u32);
            }
        }
    }
    for (_, stream) in upstream.values() {
        out.extend(unmasked(stream));
    }
    out
}

/// The payloads of the masked WebSocket frames after an HTTP head.
fn unmasked(stream: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(head) = stream.windows(4).position(|w| w == b"\r\n\r\n") else {
        return out;
    };
    let mut b = &stream[head + 4..];
    while b.len() >= 2 {
        let (skip, len) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (4, usize::from(u16::from_be_bytes([b[2], b[3]]))),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (
                    10,
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                )
            }
            126 | 127 => break,
            n => (2, usize::from(n)),
        };
        let masked = b[1] & 0x80 != 0;
        let key_len = if masked { 4 } else { 0 };
        let Some(payload) = b.get(skip + key_len..skip + key_len + len) else {
            break;
        };
        let key = &b[skip..skip + key_len];
        out.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, x)| if masked { x ^ key[i % 4] } else { *x }),
        );
        b = &b[skip + key_len + len..];
    }
    out
}

/// A CA and a certificate for the rendezvous address, as PEM files.
fn pki(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.subject_alt_names
        .push(SanType::IpAddress(RENDEZVOUS_IP.parse()?));
    let cert = leaf.signed_by(&key, &issuer)?;
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    punch_service::secret_file::write_private(&paths.2, key.serialize_pem().as_bytes(), true)?;
    Ok(paths)
}

/// Rewrites `[rendezvous] url = …` in both daemons' configs to `lines`.
fn set_rendezvous(run: &Run, lines: &str) -> Result<()> {
    for who in ["alice", "bob"] {
        let path = run.dir.join(format!("{who}.toml"));
        let text = std::fs::read_to_string(&path)?;
        let url = format!("url = \"http://{RENDEZVOUS_IP}:8080\"\n");
        if !text.contains(&url) {
            bail!("{} has no {url:?} line to replace", path.display());
        }
        std::fs::write(&path, text.replace(&url, lines))?;
    }
    Ok(())
}

/// Restarts both daemons with a capture of the rendezvous link running,
/// waits for a direct path, and returns what the capture saw.
fn capture_while_punching(run: &mut Run, name: &str) -> Result<Seen> {
    run.topo.host_a.kill(run.alice);
    run.topo.host_b.kill(run.bob);
    let pcap = run.dir.join(format!("{name}.pcap"));
    let pcap_arg = pcap.to_str().unwrap_or("link.pcap").to_owned();
    let log = run.dir.join(format!("{name}.tcpdump.txt"));
    let filter = [
        "-U",
        "--immediate-mode",
        "-n",
        "-i",
        "any",
        "-w",
        &pcap_arg,
        "tcp",
        "port",
        "8080",
    ];
    let tcpdump = run
        .topo
        .rv
        .spawn(Path::new("tcpdump"), &filter, &[], &log)?;
    std::thread::sleep(Duration::from_millis(500));
    run.bob = run.start_daemon("bob")?;
    run.alice = run.start_daemon("alice")?;
    let result = run
        .wait_path("alice", PathState::Direct, Duration::from_secs(30))
        .and_then(|_| run.transfer(1024 * 1024, 1));
    run.topo.rv.terminate(tcpdump, Duration::from_secs(3));
    let report = result.map_err(|e| run.explain(e))?;
    if !report.ok {
        bail!("{name}: the transfer through the tunnel failed");
    }
    seen(&pcap)
}

/// Plain http (the control), then https with a pinned server key.
pub fn rendezvous_link_is_opaque(bins: &Binaries) -> Result<String> {
    let mut s = Scenario::new(
        "trust-link",
        Layout::TwoNats(NatBehaviour::Masquerade),
        Expect::Direct,
    );
    s.rendezvous_config = Some(format!("token = \"{TOKEN}\"\n"));
    let mut run = Run::start(&s, bins)?;

    set_rendezvous(
        &run,
        &format!("url = \"http://{RENDEZVOUS_IP}:8080\"\ntoken = \"{TOKEN}\"\n"),
    )?;
    let plain = capture_while_punching(&mut run, "plain")?;
    if !plain.token || !plain.json {
        bail!("the capture of plain http did not show the token and JSON ({plain:?}): it would prove nothing about https");
    }

    let (ca, cert, key) = pki(&run.dir)?;
    let rv_toml = format!(
        "token = \"{TOKEN}\"\nkey_file = \"server.key\"\n[tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    std::fs::write(run.dir.join("rendezvous.toml"), rv_toml)?;
    run.topo.rv.kill(run.rendezvous);
    run.start_rendezvous(None)?;
    let out = std::process::Command::new(&bins.rendezvous)
        .args(["pubkey", "--key"])
        .arg(run.dir.join("server.key"))
        .output()?;
    let server_key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || server_key.len() != 44 {
        bail!(
            "punch-rendezvous pubkey: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The token line from the plain phase stays.
    set_rendezvous(
        &run,
        &format!(
            "url = \"https://{RENDEZVOUS_IP}:8080\"\nca_file = {:?}\nserver_key = \"{server_key}\"\n",
            ca.display().to_string()
        ),
    )?;
    let tls = capture_while_punching(&mut run, "tls")?;
    if tls.bytes < 2000 {
        bail!(
            "the https capture is nearly empty ({} bytes): nothing was captured",
            tls.bytes
        );
    }
    if tls.token || tls.json {
        bail!("the https link shows protocol data in clear: {tls:?}");
    }
    Ok(format!(
        "plain http: token and JSON visible ({} B captured); https: neither ({} B), direct with a pinned server key",
        plain.bytes, tls.bytes
    ))
}

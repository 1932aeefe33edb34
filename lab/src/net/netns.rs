//! One network namespace: create it, run commands and processes in it,
//! remove it together with everything running inside.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context as _, Result};

/// Runs a command, failing with its stderr if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A namespace this process created. Dropping it kills what runs inside
/// and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    /// Creates `name` (removing a stale one left by a crashed run) with
    /// loopback up.
    pub fn create(name: &str) -> Result<Self> {
        remove(name);
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
            children: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a command inside, failing on a non-zero exit.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["netns", "exec", self.name.as_str(), cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a command inside and returns its output whatever the exit code.
    pub fn exec_output(&self, cmd: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .context("cannot run ip netns exec")
    }

    /// Applies an nftables rule set inside.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, ruleset.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {}: {}\n{ruleset}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The packets counted so far by the first `counter` in nftables table
    /// `family table` inside (a test's own counting rule).
    pub fn nft_counter(&self, family: &str, table: &str) -> Result<u64> {
        let out = self.exec("nft", &["list", "table", family, table])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no counter in {text}"))
    }

    /// Starts a long-running process inside, logging to `log`. It is killed
    /// when the namespace is dropped; returns its index for [`Self::kill`].
    pub fn spawn(
        &mut self,
        cmd: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<usize> {
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = file.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(cmd)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {} in {}", cmd.display(), self.name))?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// The pid of a spawned process (`ip netns exec` execs the command, so
    /// it is the command's own pid).
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.children.get(index).map(std::process::Child::id)
    }

    /// Kills one spawned process (SIGKILL) and reaps it.
    pub fn kill(&mut self, index: usize) {
        if let Some(c) = self.children.get_mut(index) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM to a spawned process and waits up to `timeout` for it
    /// to exit; returns its exit code if it did.
    pub fn terminate(&mut self, index: usize, timeout: std::time::Duration) -> Option<i32> {
        let c = self.children.get_mut(index)?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// Whether a spawned process is still running.
    pub fn is_running(&mut self, index: usize) -> bool {
        self.children
            .get_mut(index)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove(&self.name);
    }
}

/// Kills every process in namespace `name` and deletes it; quiet if absent.
pub fn remove(name: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
    // Its /etc overrides (see `set_hosts`), if any.
    if !name.is_empty() && !name.contains('/') {
        let _ = std::fs::remove_dir_all(std::path::Path::new(NETNS_ETC).join(name));
    }
}

/// Where `ip netns exec NAME` finds files to bind-mount over `/etc` for
/// what it runs.
const NETNS_ETC: &str = "/etc/netns";

/// Gives what runs in namespace `name` its own `/etc/hosts` (`ip netns
/// exec` bind-mounts `/etc/netns/NAME/hosts` over it): how a lab host
/// resolves a name to the lab's addresses. Removed with the namespace.
pub fn set_hosts(name: &str, hosts: &str) -> Result<()> {
    let dir = std::path::Path::new(NETNS_ETC).join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("hosts"), hosts)
        .with_context(|| format!("cannot write {}/hosts", dir.display()))
}

/// Removes every namespace whose name starts with `prefix`.
pub fn remove_all(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next() {
                if name.starts_with(prefix) {
                    remove(name);
                }
            }
        }
    }
}

/// Namespaces removed by [`cleanup`]: every lab prefix.
pub const ALL_PREFIX: &str = "pl-";

/// Removes every lab namespace (after a crash or Ctrl-C).
pub fn cleanup() {
    remove_all(ALL_PREFIX);
}

/// Whether `ns` has a TCP listener on `port`.
pub fn listens_on(ns: &str, port: u16) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-ltnH"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
        })
        .unwrap_or(false)
}

/// The lab's namespace prefix for a scenario name.
pub fn prefix(name: &str) -> String {
    format!("{ALL_PREFIX}{name}-")
}

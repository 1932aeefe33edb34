//! The rendezvous server run from its container image inside the lab, the
//! way `deploy/` ships it: `podman run` joined to the lab's rendezvous
//! namespace, with the image's own health check and non-root user.
//!
//! Debian's podman needs runc and cgroupfs on these machines (crun fails on
//! their cgroup setup) and explicit rlimits; periodic health checks need
//! systemd timers, which a CI container does not have, so the check is run
//! on demand with `podman healthcheck run`, as an orchestrator would.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// Global podman flags that work on these machines.
pub const PODMAN: &[&str] = &["--runtime", "runc", "--cgroup-manager", "cgroupfs"];

fn podman(args: &[&str]) -> Result<std::process::Output> {
    Command::new("podman")
        .args(PODMAN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run podman {}", args.join(" ")))
}

/// A running container; removed (forcibly) when dropped.
#[derive(Debug)]
pub struct Container {
    name: String,
    /// The attached `podman run`, whose output is the container's log.
    client: Child,
}

impl Container {
    /// Runs `image` (default command) in the network namespace `netns`,
    /// logging to `log`.
    pub fn run_in_netns(image: &str, name: &str, netns: &str, log: &Path) -> Result<Self> {
        let _ = podman(&["rm", "--force", "--time", "0", name]);
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = file.try_clone()?;
        let network = format!("ns:/run/netns/{netns}");
        let client = Command::new("podman")
            .args(PODMAN)
            .args(["run", "--name", name, "--network", &network])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            // No systemd timers here: the check runs on demand (see above).
            .args(["--health-interval", "disable"])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .context("cannot start podman: is it installed?")?;
        Ok(Self {
            name: name.to_owned(),
            client,
        })
    }

    /// Runs the image's HEALTHCHECK until it passes; returns how long that
    /// took.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.client.try_wait() {
                bail!("the container exited ({status}) before it was healthy");
            }
            let ran = podman(&["healthcheck", "run", &self.name])?;
            if ran.status.success() {
                let status = self.inspect("{{.State.Health.Status}}")?;
                if status == "healthy" {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "container {} not healthy after {timeout:?}: {}",
                    self.name,
                    String::from_utf8_lossy(&ran.stderr).trim()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The uid the container's main process runs as, read from the host's
    /// /proc (not from the image metadata, which could say anything).
    pub fn process_uid(&self) -> Result<u32> {
        let pid = self.inspect("{{.State.Pid}}")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("container process {pid} is gone"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .context("no Uid line in /proc/PID/status")
    }

    /// `podman stop` (SIGTERM, then SIGKILL after `grace`); returns the
    /// container's exit code.
    pub fn stop(&mut self, grace: Duration) -> Result<i32> {
        let secs = grace.as_secs().max(1).to_string();
        let out = podman(&["stop", "--time", &secs, &self.name])?;
        if !out.status.success() {
            bail!(
                "podman stop failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let _ = self.client.wait();
        self.inspect("{{.State.ExitCode}}")?
            .parse()
            .context("podman inspect gave no exit code")
    }

    fn inspect(&self, format: &str) -> Result<String> {
        let out = podman(&["inspect", "--format", format, &self.name])?;
        if !out.status.success() {
            bail!(
                "podman inspect {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.name]);
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

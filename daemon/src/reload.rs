//! What a config reload changes, decided without IO: old `peer.toml` and
//! new `peer.toml` in, a [`Plan`] out; `daemon.rs` carries it out.
//!
//! The rule is "touch only what changed":
//! - a peer whose `[[peers]]` entry is the same keeps its task, tunnel and
//!   streams; one whose `public_key` changed is removed and added again
//!   (its tunnel was authenticated with the old key); a removed peer's
//!   task stops and closes its tunnel.
//! - a forward (listen, peer, service) that is the same, to a peer that
//!   stays, keeps its listener and connections; others are closed or bound.
//! - the `[[expose]]` table is swapped whole: new streams see the new
//!   table, streams already connected keep their target.
//! - whether we have forwards to a kept peer (so ask for punches) follows.
//! - `name`, `key_file`, `[rendezvous]`, `[punch]` and `[admin]` are the
//!   daemon's identity and sockets; a change there is reported as needing
//!   a restart and the running values stay.

use std::collections::HashSet;

use punch_config::{PeerConfig, PeerEntry};

/// The changes a reload makes, in terms of the two configs.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Peers to stop (removed, or re-keyed), by name.
    pub(crate) peers_removed: Vec<String>,
    /// Peers to start (added, or re-keyed).
    pub(crate) peers_added: Vec<PeerEntry>,
    /// Kept peers whose "we have forwards to it" flag flips.
    pub(crate) initiator: Vec<(String, bool)>,
    /// The `[[expose]]` table differs.
    pub(crate) exposes_changed: bool,
    /// Indexes into the old `forward` list to close.
    pub(crate) forwards_removed: Vec<usize>,
    /// Indexes into the new `forward` list to bind.
    pub(crate) forwards_added: Vec<usize>,
    /// (old index, new index) of forwards kept as they run.
    pub(crate) forwards_kept: Vec<(usize, usize)>,
    /// Sections that changed but take effect only at a restart.
    pub(crate) needs_restart: Vec<&'static str>,
}

impl Plan {
    /// Whether the reload changes nothing that runs.
    pub(crate) fn is_empty(&self) -> bool {
        self.peers_removed.is_empty()
            && self.peers_added.is_empty()
            && self.initiator.is_empty()
            && !self.exposes_changed
            && self.forwards_removed.is_empty()
            && self.forwards_added.is_empty()
    }

    /// One line for the log and the reload's reply.
    pub(crate) fn summary(&self, old: &PeerConfig, new: &PeerConfig) -> String {
        let mut parts = Vec::new();
        let added: Vec<_> = self.peers_added.iter().map(|p| p.name.as_str()).collect();
        if !added.is_empty() {
            parts.push(format!("peers started: {}", added.join(", ")));
        }
        if !self.peers_removed.is_empty() {
            parts.push(format!("peers stopped: {}", self.peers_removed.join(", ")));
        }
        let fwd = |f: &punch_config::Forward| format!("{} → {}/{}", f.listen, f.peer, f.service);
        if !self.forwards_added.is_empty() {
            let v: Vec<_> = self
                .forwards_added
                .iter()
                .map(|&i| fwd(&new.forward[i]))
                .collect();
            parts.push(format!("forwards added: {}", v.join(", ")));
        }
        if !self.forwards_removed.is_empty() {
            let v: Vec<_> = self
                .forwards_removed
                .iter()
                .map(|&i| fwd(&old.forward[i]))
                .collect();
            parts.push(format!("forwards removed: {}", v.join(", ")));
        }
        if self.exposes_changed {
            parts.push(format!("exposes now: {}", new.expose.len()));
        }
        if parts.is_empty() {
            parts.push("nothing to change".to_owned());
        }
        if !self.needs_restart.is_empty() {
            parts.push(format!(
                "changed but kept until a restart: {}",
                self.needs_restart.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// The plan that takes a daemon running `old` to `new`.
pub(crate) fn plan(old: &PeerConfig, new: &PeerConfig) -> Plan {
    let mut plan = Plan::default();
    let mut rekeyed = HashSet::new();
    for p in &old.peers {
        match new.peer(p.name.as_str()) {
            Some(n) if n == p => {}
            Some(_) => {
                rekeyed.insert(p.name.as_str());
                plan.peers_removed.push(p.name.to_string());
            }
            None => plan.peers_removed.push(p.name.to_string()),
        }
    }
    for p in &new.peers {
        if old.peer(p.name.as_str()).is_none_or(|o| o != p) {
            plan.peers_added.push(p.clone());
        }
    }
    let has_forwards =
        |cfg: &PeerConfig, name: &str| cfg.forward.iter().any(|f| f.peer.as_str() == name);
    for p in &new.peers {
        let kept = old.peer(p.name.as_str()).is_some_and(|o| o == p);
        let now = has_forwards(new, p.name.as_str());
        if kept && has_forwards(old, p.name.as_str()) != now {
            plan.initiator.push((p.name.to_string(), now));
        }
    }
    plan.exposes_changed = old.expose != new.expose;
    // A forward is kept only if an identical one runs and its peer stays
    // as it is (its listener holds that peer's task).
    let mut taken = vec![false; old.forward.len()];
    for (ni, f) in new.forward.iter().enumerate() {
        let same = old
            .forward
            .iter()
            .enumerate()
            .find(|(oi, o)| !taken[*oi] && *o == f && !rekeyed.contains(f.peer.as_str()));
        match same {
            Some((oi, _)) => {
                taken[oi] = true;
                plan.forwards_kept.push((oi, ni));
            }
            None => plan.forwards_added.push(ni),
        }
    }
    plan.forwards_removed = (0..old.forward.len()).filter(|i| !taken[*i]).collect();
    let rv = |c: &PeerConfig| {
        let r = &c.rendezvous;
        (
            r.url.clone(),
            r.token.clone(),
            r.token_file.clone(),
            r.ca_file.clone(),
            r.server_key,
        )
    };
    for (what, changed) in [
        ("name", old.name != new.name),
        ("key_file", old.key_file != new.key_file),
        ("[rendezvous]", rv(old) != rv(new)),
        ("[punch]", old.punch != new.punch),
        ("[admin]", old.admin != new.admin),
    ] {
        if changed {
            plan.needs_restart.push(what);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const KEY_A: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const KEY_B: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const KEY_C: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

    fn cfg(body: &str) -> PeerConfig {
        let text = format!(
            "name = \"alice\"\nkey_file = \"alice.key\"\n[rendezvous]\nurl = \"http://127.0.0.1:8080\"\n{body}"
        );
        PeerConfig::parse_str(Path::new("peer.toml"), &text).unwrap()
    }

    fn peer(name: &str, key: &str) -> String {
        format!("[[peers]]\nname = \"{name}\"\npublic_key = \"{key}\"\n")
    }

    fn forward(listen: &str, peer: &str, service: &str) -> String {
        format!("[[forward]]\nlisten = \"{listen}\"\npeer = \"{peer}\"\nservice = \"{service}\"\n")
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let body = format!(
            "{}{}",
            peer("bob", KEY_A),
            forward("127.0.0.1:2000", "bob", "a")
        );
        let p = plan(&cfg(&body), &cfg(&body));
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.forwards_kept, vec![(0, 0)]);
        assert!(p.needs_restart.is_empty());
    }

    #[test]
    fn forwards_are_added_and_removed_and_the_rest_kept() {
        let old = cfg(&format!(
            "{}{}{}",
            peer("bob", KEY_A),
            forward("127.0.0.1:2000", "bob", "a"),
            forward("127.0.0.1:2002", "bob", "c"),
        ));
        let new = cfg(&format!(
            "{}{}{}",
            peer("bob", KEY_A),
            forward("127.0.0.1:2001", "bob", "b"),
            forward("127.0.0.1:2000", "bob", "a"),
        ));
        let p = plan(&old, &new);
        assert_eq!(p.forwards_kept, vec![(0, 1)]);
        assert_eq!(p.forwards_added, vec![0]);
        assert_eq!(p.forwards_removed, vec![1]);
        assert!(p.peers_added.is_empty() && p.peers_removed.is_empty());
        assert!(p.initiator.is_empty());
        let line = p.summary(&old, &new);
        assert!(
            line.contains("forwards added: 127.0.0.1:2001 → bob/b"),
            "{line}"
        );
        assert!(
            line.contains("forwards removed: 127.0.0.1:2002 → bob/c"),
            "{line}"
        );
        // A forward that changes its service is a new forward.
        let moved = cfg(&format!(
            "{}{}",
            peer("bob", KEY_A),
            forward("127.0.0.1:2000", "bob", "z")
        ));
        let p = plan(&old, &moved);
        assert_eq!(
            (p.forwards_added, p.forwards_removed),
            (vec![0], vec![0, 1])
        );
    }

    #[test]
    fn peers_added_removed_and_rekeyed() {
        let old = cfg(&format!(
            "{}{}{}",
            peer("bob", KEY_A),
            peer("carol", KEY_B),
            forward("127.0.0.1:2000", "carol", "a")
        ));
        let new = cfg(&format!(
            "{}{}{}",
            peer("carol", KEY_C),
            peer("dave", KEY_A),
            forward("127.0.0.1:2000", "carol", "a")
        ));
        let p = plan(&old, &new);
        assert_eq!(p.peers_removed, vec!["bob".to_owned(), "carol".to_owned()]);
        let added: Vec<_> = p.peers_added.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(added, ["carol", "dave"]);
        // carol's forward holds the old carol's task: it is rebound.
        assert_eq!((p.forwards_added, p.forwards_removed), (vec![0], vec![0]));
        assert!(p.forwards_kept.is_empty());
    }

    #[test]
    fn a_kept_peer_learns_whether_it_has_forwards_and_other_sections_wait() {
        let old = cfg(&peer("bob", KEY_A));
        let new = cfg(&format!(
            "{}{}[[expose]]\nname = \"s\"\ntarget = \"127.0.0.1:22\"\nallow = [\"bob\"]\n",
            peer("bob", KEY_A),
            forward("127.0.0.1:2000", "bob", "a")
        )
        .replace("[[peers]]", "[punch]\nport = 4000\n[[peers]]"));
        let p = plan(&old, &new);
        assert_eq!(p.initiator, vec![("bob".to_owned(), true)]);
        assert!(p.exposes_changed);
        assert_eq!(p.needs_restart, vec!["[punch]"]);
        let back = plan(&new, &old);
        assert_eq!(back.initiator, vec![("bob".to_owned(), false)]);
        assert!(back
            .summary(&new, &old)
            .contains("kept until a restart: [punch]"));
    }
}

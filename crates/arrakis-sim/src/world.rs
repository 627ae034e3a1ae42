//! The simulated server's state: VMs, the §4 allocators, snapshots, and the §3.2 transition
//! table, with every error message byte-for-byte as the real server words it.
//!
//! Everything here is synchronous and runs under one lock; timing (boot delay, the snapshot's
//! paused window, proxy timeouts) lives in the HTTP layer, which calls in before and after.
//! Methods return `Err(message)` for what the real server reports as a 500.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{fs::GuestFs, shell::Processes};

/// What Go prints for the CHV client's response body reader (`%v` of a `NopCloser`); its
/// value is an address, so any fixed text is as good as the real one.
pub const OPAQUE_BODY: &str = "{0xc0001b4000}";
/// The status line cloud-hypervisor answers a refused state change with.
pub const CHV_REFUSED: &str = "500 Internal Server Error";

/// Guest ports forwarded by the default config: `5901` "gui", then `5736-5740` "code".
const GUEST_PORTS: &[(u16, &str)] = &[
    (5901, "gui"),
    (5736, "code (range 5736-5740)"),
    (5737, "code (range 5736-5740)"),
    (5738, "code (range 5736-5740)"),
    (5739, "code (range 5736-5740)"),
    (5740, "code (range 5736-5740)"),
];
const SUBNET: [u8; 3] = [10, 20, 1];
const CID_RANGE: (u32, u32) = (3, 1000);
const TAP_MAX: u32 = 65535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum VmStatus {
    Running,
    Paused,
    Stopped,
}

impl VmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Running => "RUNNING",
            VmStatus::Paused => "PAUSED",
            VmStatus::Stopped => "STOPPED",
        }
    }
}

/// `PortForward` on the wire: ports as decimal strings, keys in Go's alphabetical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePortForward {
    pub description: String,
    pub guest_port: String,
    pub host_port: String,
}

/// `VmInfo` on the wire, fields in the alphabetical order the Go server emits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireVmInfo {
    pub ip: String,
    pub port_forwards: Vec<WirePortForward>,
    pub status: String,
    pub tap_device_name: String,
    pub vm_name: String,
}

/// One registered VM.
#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    pub status: VmStatus,
    pub ip: u8,
    pub tap: u32,
    pub cid: u32,
    pub ports: Vec<(u16, u16, &'static str)>,
    /// Restored VMs have no recorded stateful disk, so they can never be snapshotted (§2.8).
    pub restored: bool,
    pub fs: GuestFs,
    /// Unique per registration, so work started for a destroyed VM never touches a new VM of
    /// the same name.
    pub incarnation: u64,
    /// Bumped when guest processes die (stop, cold boot), ending background commands.
    pub boot_gen: u64,
    /// The guest's running commands (see [`crate::shell`]).
    pub procs: Processes,
}

impl Vm {
    pub fn ip_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], self.ip)
    }

    pub fn wire(&self) -> WireVmInfo {
        WireVmInfo {
            ip: format!("{}/24", self.ip_addr()),
            port_forwards: self
                .ports
                .iter()
                .map(|(host, guest, desc)| WirePortForward {
                    description: desc.to_string(),
                    guest_port: guest.to_string(),
                    host_port: host.to_string(),
                })
                .collect(),
            status: self.status.as_str().to_string(),
            tap_device_name: format!("tap{}", self.tap),
            vm_name: self.name.clone(),
        }
    }
}

/// A snapshot directory: what restore needs, plus the guest's files and memory (the fs copy).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub orig_name: String,
    pub ip: u8,
    pub tap: u32,
    pub cid: u32,
    pub fs: GuestFs,
}

/// How a successful POST /v1/vms went, so the caller knows whether the VM is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    Created,
    Restored,
    ColdBooted,
    Resumed,
}

/// The whole simulated server.
#[derive(Debug)]
pub struct World {
    pub vms: HashMap<String, Vm>,
    /// `None` while a snapshot is being taken: the directory exists but is not restorable.
    pub snapshots: BTreeMap<String, Option<Snapshot>>,
    ips: VecDeque<u8>,
    taps: VecDeque<u32>,
    cids: VecDeque<u32>,
    next_port: u32,
    port_range: (u16, u16),
    incarnations: u64,
}

impl World {
    pub fn new(port_range: (u16, u16)) -> Self {
        Self {
            vms: HashMap::new(),
            snapshots: BTreeMap::new(),
            ips: (2..=255).collect(),
            taps: (0..=TAP_MAX).collect(),
            cids: (CID_RANGE.0..=CID_RANGE.1).collect(),
            next_port: u32::from(port_range.0),
            port_range,
            incarnations: 0,
        }
    }

    /// What a server restart does: every VM gone, allocators fresh (host ports included, as
    /// they live in the process), snapshots kept on disk.
    pub fn restart(&mut self, port_range: (u16, u16)) {
        let snapshots = std::mem::take(&mut self.snapshots);
        let incarnations = self.incarnations;
        *self = World::new(port_range);
        self.incarnations = incarnations;
        self.snapshots = snapshots.into_iter().filter(|(_, s)| s.is_some()).collect();
    }

    /// Applies a changed port range to future allocations without reissuing used ports.
    pub fn set_port_range(&mut self, range: (u16, u16)) {
        if range != self.port_range {
            self.port_range = range;
            self.next_port = self.next_port.max(u32::from(range.0));
        }
    }

    pub fn next_host_port(&self) -> u32 {
        self.next_port
    }

    /// Hands out the next host port, or the portalloc error.
    fn alloc_port(&mut self) -> Result<u16, String> {
        let (first, last) = self.port_range;
        match u16::try_from(self.next_port) {
            Ok(port) if port <= last => {
                self.next_port += 1;
                Ok(port)
            }
            _ => Err(format!(
                "failed to forward ports to VM: failed to allocate port: no available ports in range {first}-{last}"
            )),
        }
    }

    /// One host port per default guest port, in order; ports taken before a failure stay taken.
    fn alloc_ports(&mut self) -> Result<Vec<(u16, u16, &'static str)>, String> {
        GUEST_PORTS.iter().map(|(guest, desc)| Ok((self.alloc_port()?, *guest, *desc))).collect()
    }

    fn free_ip(&mut self, ip: u8) {
        // A restore can claim an IP another VM holds, so don't queue it twice.
        if !self.ips.contains(&ip) {
            self.ips.push_back(ip);
        }
    }

    fn release(&mut self, vm: &Vm) {
        self.taps.push_back(vm.tap);
        self.free_ip(vm.ip);
        self.cids.push_back(vm.cid);
    }

    fn next_incarnation(&mut self) -> u64 {
        self.incarnations += 1;
        self.incarnations
    }

    pub fn get(&self, name: &str) -> Result<&Vm, String> {
        self.vms
            .get(name)
            .ok_or_else(|| format!("Failed to list VM: rpc error: code = NotFound desc = vm not found: {name}"))
    }

    /// POST /v1/vms after validation. `zombie` makes a new VM's boot fail after registration.
    pub fn start(
        &mut self,
        name: &str,
        snapshot_id: Option<&str>,
        zombie: bool,
    ) -> Result<(WireVmInfo, StartKind), String> {
        if let Some(id) = snapshot_id.filter(|id| !id.is_empty()) {
            return self
                .restore(name, id)
                .map(|info| (info, StartKind::Restored))
                .map_err(|e| format!("Failed to start VM: failed to restore VM from snapshot: {e}"));
        }
        if let Some(vm) = self.vms.get_mut(name) {
            let kind = match vm.status {
                VmStatus::Running => {
                    return Err(format!(
                        "Failed to start VM: rpc error: code = Internal desc = failed to boot existing VM: failed to boot VM resp.Body: {OPAQUE_BODY}: {CHV_REFUSED}"
                    ))
                }
                VmStatus::Paused => StartKind::Resumed,
                VmStatus::Stopped => {
                    vm.fs.clear_tmp();
                    vm.boot_gen += 1;
                    vm.procs.clear();
                    StartKind::ColdBooted
                }
            };
            vm.status = VmStatus::Running;
            return Ok((vm.wire(), kind));
        }
        let vm = self.create(name).map_err(|e| format!("Failed to start VM: {e}"))?;
        let info = vm.wire();
        self.vms.insert(name.to_string(), vm);
        if zombie {
            // The rollback only shuts the guest down: the VM stays registered as RUNNING.
            return Err(format!("Failed to start VM: failed to boot VM resp.Body: {OPAQUE_BODY}: {CHV_REFUSED}"));
        }
        Ok((info, StartKind::Created))
    }

    /// `createVM`: tap, IP, ports, CID, in that order; a failure gives back all but the ports.
    fn create(&mut self, name: &str) -> Result<Vm, String> {
        let tap = self.taps.pop_front().ok_or("failed to create tap device: no available taps")?;
        let Some(ip) = self.ips.pop_front() else {
            self.taps.push_front(tap);
            return Err("error allocating guest ip: no available IPs".into());
        };
        let ports = match self.alloc_ports() {
            Ok(ports) => ports,
            Err(e) => {
                self.taps.push_front(tap);
                self.ips.push_front(ip);
                return Err(e);
            }
        };
        let Some(cid) = self.cids.pop_front() else {
            self.taps.push_front(tap);
            self.ips.push_front(ip);
            return Err(format!("failed to allocate CID: no available CIDs in range {}-{}", CID_RANGE.0, CID_RANGE.1));
        };
        Ok(Vm {
            name: name.to_string(),
            status: VmStatus::Running,
            ip,
            tap,
            cid,
            ports,
            restored: false,
            fs: GuestFs::new(name),
            incarnation: self.next_incarnation(),
            boot_gen: 0,
            procs: Processes::default(),
        })
    }

    /// `restoreVM` (§3.5), returning the text after `failed to restore VM from snapshot: `.
    fn restore(&mut self, name: &str, id: &str) -> Result<WireVmInfo, String> {
        let Some(Some(snap)) = self.snapshots.get(id).cloned() else {
            return Err(format!("snapshot with ID {id} does not exist"));
        };
        let Some(pos) = self.taps.iter().position(|t| *t == snap.tap) else {
            return Err(format!("failed to create tap device: tap ID {} is not available", snap.tap));
        };
        self.taps.remove(pos);
        // Claiming an in-subnet IP never fails, even when another VM uses it.
        let ip_was_free = match self.ips.iter().position(|ip| *ip == snap.ip) {
            Some(pos) => {
                self.ips.remove(pos);
                true
            }
            None => false,
        };
        let undo_claims = |world: &mut World| {
            world.taps.push_back(snap.tap);
            if ip_was_free {
                world.free_ip(snap.ip);
            }
        };
        if self.vms.contains_key(name) {
            // The real server would collide with the live VM's sockets and may destroy it
            // (§3.5); the simulator refuses instead.
            undo_claims(self);
            return Err(format!("failed to create VM for restore: vm {name} already exists"));
        }
        let ports = match self.alloc_ports() {
            Ok(ports) => ports,
            Err(e) => {
                undo_claims(self);
                return Err(e);
            }
        };
        let Some(pos) = self.cids.iter().position(|c| *c == snap.cid) else {
            undo_claims(self);
            return Err(format!("failed to claim CID from allocator: CID {} is not available", snap.cid));
        };
        self.cids.remove(pos);
        if snap.orig_name != name {
            // CHV's saved config points at the source VM's disk and vsock paths, which only
            // exist again under the original name.
            undo_claims(self);
            self.cids.push_back(snap.cid);
            return Err(format!("failed to restore VM: failed to restore from snapshot: {CHV_REFUSED}"));
        }
        let vm = Vm {
            name: name.to_string(),
            status: VmStatus::Running,
            ip: snap.ip,
            tap: snap.tap,
            cid: snap.cid,
            ports,
            restored: true,
            fs: snap.fs,
            incarnation: self.next_incarnation(),
            boot_gen: 0,
            procs: Processes::default(),
        };
        let info = vm.wire();
        self.vms.insert(name.to_string(), vm);
        Ok(info)
    }

    pub fn stop(&mut self, name: &str) -> Result<(), String> {
        let vm = self.vms.get_mut(name).ok_or_else(|| {
            format!("Failed to change VM state to 'stopped': rpc error: code = NotFound desc = vm {name} not found")
        })?;
        if vm.status == VmStatus::Stopped {
            return Err(format!(
                "Failed to change VM state to 'stopped': rpc error: code = Internal desc = failed to stop VM: {CHV_REFUSED}"
            ));
        }
        vm.status = VmStatus::Stopped;
        vm.boot_gen += 1;
        vm.procs.clear();
        Ok(())
    }

    pub fn pause(&mut self, name: &str) -> Result<(), String> {
        self.transition(name, "paused", "pause", VmStatus::Running, VmStatus::Paused)
    }

    pub fn resume(&mut self, name: &str) -> Result<(), String> {
        self.transition(name, "resume", "resume", VmStatus::Paused, VmStatus::Running)
    }

    fn transition(
        &mut self,
        name: &str,
        verb: &str,
        chv_call: &str,
        from: VmStatus,
        to: VmStatus,
    ) -> Result<(), String> {
        let vm = self.vms.get_mut(name).ok_or_else(|| {
            format!("Failed to change VM state to '{verb}': rpc error: code = NotFound desc = vm not found: {name}")
        })?;
        if vm.status != from {
            return Err(format!(
                "Failed to change VM state to '{verb}': rpc error: code = Internal desc = failed to {chv_call} VM: failed to {chv_call} VM resp.Body: {OPAQUE_BODY}: {CHV_REFUSED}"
            ));
        }
        vm.status = to;
        Ok(())
    }

    /// DELETE /v1/vms/{name}: frees tap, IP and CID (never the host ports).
    pub fn delete(&mut self, name: &str) -> Result<(), String> {
        let vm = self.vms.remove(name).ok_or_else(|| {
            format!("Failed to destroy VM: rpc error: code = Internal desc = failed to destroy vm: {name}: vm {name} not found")
        })?;
        self.release(&vm);
        Ok(())
    }

    /// DELETE /v1/vms: one by one, in no particular order.
    pub fn delete_all(&mut self) {
        let mut names: Vec<String> = self.vms.keys().cloned().collect();
        names.sort();
        for name in names {
            let _ = self.delete(&name);
        }
    }

    /// Snapshot steps 2–6: checks, reserves the id and pauses the VM. The caller waits (the
    /// guest is frozen meanwhile), then calls [`World::snapshot_finish`].
    pub fn snapshot_begin(&mut self, name: &str, id: &str) -> Result<u64, String> {
        let vm = self.vms.get(name).ok_or_else(|| {
            format!("Failed to create snapshot: rpc error: code = NotFound desc = vm not found: {name}")
        })?;
        if snapshot_dir_exists(&self.snapshots, id) {
            return Err(format!("Failed to create snapshot: snapshot with ID {id} already exists"));
        }
        if vm.status != VmStatus::Running {
            return Err(format!("Failed to create snapshot: failed to pause VM: {CHV_REFUSED}"));
        }
        if vm.restored {
            // Step 7 fails on the empty disk path; the VM is resumed and the directory removed.
            return Err("Failed to create snapshot: failed to copy stateful disk to snapshot directory: source file not found: stat : no such file or directory".into());
        }
        let incarnation = vm.incarnation;
        self.snapshots.insert(id.to_string(), None);
        if let Some(vm) = self.vms.get_mut(name) {
            vm.status = VmStatus::Paused;
        }
        Ok(incarnation)
    }

    /// Snapshot steps 7–10: copies the guest and resumes it.
    pub fn snapshot_finish(&mut self, name: &str, id: &str, incarnation: u64) -> Result<(), String> {
        match self.vms.get_mut(name).filter(|vm| vm.incarnation == incarnation) {
            Some(vm) => {
                let snap =
                    Snapshot { orig_name: vm.name.clone(), ip: vm.ip, tap: vm.tap, cid: vm.cid, fs: vm.fs.clone() };
                vm.status = VmStatus::Running;
                self.snapshots.insert(id.to_string(), Some(snap));
                Ok(())
            }
            None => {
                // Destroyed while frozen: its disk is gone, so the copy fails.
                self.snapshots.remove(id);
                Err("Failed to create snapshot: failed to copy stateful disk to snapshot directory: source file not found: stat : no such file or directory".into())
            }
        }
    }
}

/// Whether `<state_dir>/snapshots/<id>` already exists. An empty id (or `.`) names the
/// snapshots directory itself and `..` its parent, which always exist.
fn snapshot_dir_exists(snapshots: &BTreeMap<String, Option<Snapshot>>, id: &str) -> bool {
    let cleaned = crate::fs::resolve("/", id);
    cleaned == "/" || id.starts_with("..") || snapshots.contains_key(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocators_follow_section_four() {
        let mut w = World::new((3000, 6000));
        let (a, _) = w.start("a", None, false).unwrap();
        let (b, _) = w.start("b", None, false).unwrap();
        assert_eq!((a.ip.as_str(), a.tap_device_name.as_str()), ("10.20.1.2/24", "tap0"));
        assert_eq!((b.ip.as_str(), b.tap_device_name.as_str()), ("10.20.1.3/24", "tap1"));
        assert_eq!(a.port_forwards[0].host_port, "3000");
        assert_eq!(b.port_forwards[5].host_port, "3011");
        w.delete("a").unwrap();
        let (c, _) = w.start("c", None, false).unwrap();
        // FIFO: the freed IP and tap go to the back of the queue; ports are never reused.
        assert_eq!((c.ip.as_str(), c.tap_device_name.as_str()), ("10.20.1.4/24", "tap2"));
        assert_eq!(c.port_forwards[0].host_port, "3012");
    }

    #[test]
    fn ports_run_out_and_leak() {
        let mut w = World::new((3000, 3008));
        w.start("a", None, false).unwrap();
        let err = w.start("b", None, false).unwrap_err();
        assert_eq!(err, "Failed to start VM: failed to forward ports to VM: failed to allocate port: no available ports in range 3000-3008");
        assert!(!w.vms.contains_key("b"));
        assert_eq!(w.next_host_port(), 3009);
    }

    #[test]
    fn restore_rules() {
        let mut w = World::new((3000, 6000));
        w.start("src", None, false).unwrap();
        let inc = w.snapshot_begin("src", "s1").unwrap();
        w.snapshot_finish("src", "s1", inc).unwrap();
        let held = w.start("src", Some("s1"), false).unwrap_err();
        assert!(held.ends_with("failed to create tap device: tap ID 0 is not available"), "{held}");
        w.delete("src").unwrap();
        let other = w.start("other", Some("s1"), false).unwrap_err();
        assert!(other.contains("failed to restore from snapshot"), "{other}");
        let (info, kind) = w.start("src", Some("s1"), false).unwrap();
        assert_eq!(kind, StartKind::Restored);
        assert_eq!((info.ip.as_str(), info.tap_device_name.as_str()), ("10.20.1.2/24", "tap0"));
        assert_ne!(info.port_forwards[0].host_port, "3000");
        let again = w.snapshot_begin("src", "s2").unwrap_err();
        assert!(again.contains("source file not found"), "{again}");
        assert_eq!(w.get("src").unwrap().status, VmStatus::Running);
        let missing = w.start("x", Some("nope"), false).unwrap_err();
        assert_eq!(
            missing,
            "Failed to start VM: failed to restore VM from snapshot: snapshot with ID nope does not exist"
        );
    }

    #[test]
    fn snapshot_ids_must_be_new() {
        let mut w = World::new((3000, 6000));
        w.start("a", None, false).unwrap();
        assert_eq!(
            w.snapshot_begin("a", "").unwrap_err(),
            "Failed to create snapshot: snapshot with ID  already exists"
        );
        assert!(w.snapshot_begin("a", "..").is_err());
        let inc = w.snapshot_begin("a", "s").unwrap();
        assert_eq!(w.get("a").unwrap().status, VmStatus::Paused);
        w.snapshot_finish("a", "s", inc).unwrap();
        assert!(w.snapshot_begin("a", "s").unwrap_err().ends_with("snapshot with ID s already exists"));
        w.restart((3000, 6000));
        assert!(w.vms.is_empty());
        assert!(w.snapshots.contains_key("s"));
    }
}

//! The shapes of the values in konduit's eBPF maps, shared by the program
//! (`proxy-ebpf/`) and the loader (`proxy-user/src/dataplane/sockmap.rs`),
//! so both sides agree on every offset. Owns layouts only, no behaviour.
#![no_std]

/// One direction of one spliced connection: the bytes that arrived on its
/// source socket and what became of them, plus the credit userspace granted.
///
/// It lives in a memory-mapped array (`FLOWS`), shared live between the
/// verdict and the loader without syscalls. Each field has exactly one
/// writer, so neither side ever needs a read-modify-write of the other's
/// fields: the first two only the verdict writes (its runs for one socket
/// are serialised by that socket's lock), the last three only userspace.
///
/// The valve (SOCKMAP-NOTES rule 7): the verdict redirects an skb only while
/// `passed == delivered` (userspace has moved everything that was passed to
/// it, so a redirected byte cannot overtake a passed one) and
/// `redirected + passed + len <= limit` (credit left). Otherwise it passes
/// the skb to the source socket's own receive queue, where it is charged to
/// the receive buffer and closes the TCP window: the sender slows down.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Bytes the verdict redirected to the peer socket (verdict writes).
    pub redirected: u64,
    /// Bytes the verdict left on the source socket for userspace to move (verdict writes).
    pub passed: u64,
    /// Of `passed`, bytes userspace has read and written to the peer (userspace writes).
    pub delivered: u64,
    /// Credit: the verdict redirects only while `redirected + passed` stays at
    /// or below this (userspace writes; it only grows).
    pub limit: u64,
    /// When `redirected + passed` crosses this, the verdict posts the flow's
    /// slot on `FLOW_WAKEUPS` so userspace can grant more credit before it
    /// runs out (userspace writes).
    pub wake_at: u64,
}

/// Slots in `FLOWS`: one per direction of a spliced connection, so one per
/// socket in the sockhash (each socket is the source of one direction).
pub const MAX_FLOWS: u32 = 65_536;

/// `bpf_map_create` flag that lets userspace mmap an array map.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

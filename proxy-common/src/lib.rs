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
/// fields: `redirected`, `passed` and the last three only the verdict writes
/// (its runs for one socket are serialised by that socket's lock),
/// `delivered`, `limit` and `wake_at` only userspace.
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
    /// Bytes the verdict cut off retransmitted skbs because the socket had
    /// already received them (rule 9, see the README; verdict writes).
    pub trimmed: u64,
    /// The TCP sequence number after the last byte the verdict has seen,
    /// with [`SEQ_KNOWN`] set once it has seen one (verdict writes).
    pub next_seq: u64,
    /// Non-zero once the verdict had to drop new bytes it could not separate
    /// from a retransmitted copy: the stream has a hole and userspace must
    /// reset both sockets (verdict writes).
    pub broken: u64,
}

/// Flag in [`FlowState::next_seq`]: the low 32 bits hold a sequence number.
pub const SEQ_KNOWN: u64 = 1 << 32;

/// Offset of `cb` in the kernel's `struct sk_buff` on 64-bit kernels (after
/// the list pointers/rbnode, `sk` and `tstamp`), where TCP keeps the
/// segment's `seq` and `end_seq` (`struct tcp_skb_cb`, first two `u32`s).
/// The verdict checks every read against the skb's length, so a kernel
/// with another layout is noticed, not trusted.
pub const SKB_CB_OFFSET: usize = 40;

/// Slots in `FLOWS`: one per direction of a spliced connection, so one per
/// socket in the sockhash (each socket is the source of one direction).
pub const MAX_FLOWS: u32 = 65_536;

/// `bpf_map_create` flag that lets userspace mmap an array map.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

//! konduit's kernel data plane: joins two stream sockets so that every byte
//! received on one is sent out of the other without entering userspace, up to
//! the credit userspace granted.
//!
//! Owns only the per-skb decision (cut bytes it has seen before, then redirect
//! or leave the rest for userspace) and
//! the per-direction accounting in `FLOWS`. Userspace
//! (`proxy-user/src/dataplane/sockmap.rs` and `kernel_splice.rs`) owns
//! everything else: which sockets enter the maps and when, the rule-5 kick
//! after an insert, credit, moving passed bytes, EOF, drain, half-close and
//! removal. Rule numbers are those of SOCKMAP-NOTES.md; rule 9 (retransmitted
//! bytes) is konduit's own finding, described in the README's "Data plane".
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel};
use aya_ebpf::macros::{map, stream_verdict};
use aya_ebpf::maps::{Array, HashMap, RingBuf, SockHash};
use aya_ebpf::programs::SkBuffContext;
use konduit_common::{BPF_F_MMAPABLE, FlowState, MAX_FLOWS, SEQ_KNOWN, SKB_CB_OFFSET};

/// Allocate hash elements on insert instead of the whole table at load (BPF_F_NO_PREALLOC).
const BPF_F_NO_PREALLOC: u32 = 1;
/// `bpf_skb_adjust_room` removes at most this many bytes per call on an sk_skb.
const ADJUST_ROOM_MAX: u32 = 0xfff;
/// Calls to trim one skb: 64 × 4095 covers any 64 KiB GSO skb and then some.
const TRIM_CALLS: u32 = 64;

/// Each spliced socket, stored under its *peer's* socket cookie, so the
/// verdict of a socket finds where to send with its own cookie as the key.
/// Userspace inserts the side that does not speak first (the backend) first.
#[map]
static PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_FLOWS, 0);

/// Socket cookie → its slot in `FLOWS` (the direction that starts at it).
/// Userspace creates the entry (and resets the slot) before the socket
/// enters `PEERS` and deletes it after the socket left; the program never
/// writes it.
#[map]
static FLOW_SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Per-direction state, memory-mapped by userspace (see `FlowState` for who
/// writes which field).
#[map]
static FLOWS: Array<FlowState> = Array::with_max_entries(MAX_FLOWS, BPF_F_MMAPABLE);

/// Slots whose credit is running low: userspace wakes up and grants more
/// before the flow has to stop. One `u32` per crossing, so it stays small.
#[map]
static FLOW_WAKEUPS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Runs for every skb a socket in `PEERS` receives (attached to the map as
/// its stream verdict).
#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    // Rule 3: the FIN reaches the verdict as a zero-length skb; redirecting it
    // makes the peer report EPIPE and stop sending. Drop it: FIN is never
    // forwarded in the kernel (rule 1), userspace propagates it with
    // shutdown(SHUT_WR) once the peer has drained (rule 2).
    if len == 0 {
        return SK_DROP;
    }
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed to this
    // program; bpf_get_socket_cookie only reads the socket it belongs to.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: a plain lookup; the value is a copy of a u32.
    let Some(slot) = (unsafe { FLOW_SLOTS.get(&cookie) }).copied() else {
        // Not set up by userspace (cannot happen for sockets it inserted):
        // leave the bytes on the socket rather than send them unaccounted.
        return SK_PASS;
    };
    let Some(flow) = FLOWS.get_ptr_mut(slot) else {
        return SK_PASS;
    };
    // SAFETY: `flow` points into FLOWS' value area (see below).
    let Some(len) = (unsafe { keep_new_bytes(&ctx, flow, len as u32) }) else {
        return SK_DROP;
    };
    let len = u64::from(len);
    // SAFETY: `flow` points into the array map's value area, valid while the
    // program runs. The verdict runs of one socket are serialised by its lock
    // (softirq, or the recvmsg kick of rule 5), so it is the only writer of
    // `redirected` and `passed`; userspace writes the other fields through
    // its mapping, hence volatile reads (8-byte aligned: single loads).
    unsafe {
        let redirected = read_volatile(addr_of!((*flow).redirected));
        let passed = read_volatile(addr_of!((*flow).passed));
        let delivered = read_volatile(addr_of!((*flow).delivered));
        let limit = read_volatile(addr_of!((*flow).limit));
        let sent = redirected + passed;
        // Rule 7, the valve. Redirect only when userspace has moved every byte
        // passed to it before (else this skb would overtake them) and the
        // credit covers this skb (else the peer is not keeping up).
        if passed == delivered && sent + len <= limit {
            // Redirect to the egress (flags 0, not BPF_F_INGRESS) of the entry
            // keyed by our own cookie: our peer. The helper answers SK_PASS
            // when it found the peer (the kernel queues the skb on the peer's
            // psock and a kernel worker sends it, rule 2), SK_DROP when there
            // is none (the pair is being taken apart after both EOFs).
            let verdict = PEERS.redirect_skb(&ctx, &mut cookie, 0) as u32;
            if verdict == SK_PASS {
                write_volatile(addr_of_mut!((*flow).redirected), redirected + len);
                let wake_at = read_volatile(addr_of!((*flow).wake_at));
                if sent < wake_at && sent + len >= wake_at {
                    // Best effort: a full ring only means userspace grants when
                    // the credit runs out instead (it then sees passed bytes).
                    let _ = FLOW_WAKEUPS.output::<u32>(slot, 0);
                }
            }
            return verdict;
        }
        // SK_PASS: the skb goes to this socket's own receive queue (the psock's
        // ingress list), charged to its receive buffer, so a reader that
        // stops closes the TCP window back to the sender. Userspace reads it
        // with recv() — these bytes only, in order — and writes it to the peer.
        write_volatile(addr_of_mut!((*flow).passed), passed + len);
        SK_PASS
    }
}

/// Rule 9: `tcp_read_skb` hands the verdict whole skbs, even one TCP queued
/// although its front had arrived before (a retransmission overlapping what
/// was received: TCP queues it whole, below `rcv_nxt`, and lets readers skip
/// the old part by sequence number; this path does not, so the old bytes
/// would go out twice). Follows the sequence numbers of what this socket
/// received, cuts the old bytes off the front, and returns how many new
/// bytes the skb still holds; `None` when there are none (drop it).
///
/// The position starts at the first skb the verdict sees: no retransmission
/// can overlap bytes userspace read before the insert, since their sender
/// got our ACK before it sent anything after them (it waits for our reply).
///
/// # Safety
/// `flow` points into `FLOWS` and this socket's verdict runs are serialised.
#[inline(always)]
unsafe fn keep_new_bytes(ctx: &SkBuffContext, flow: *mut FlowState, len: u32) -> Option<u32> {
    // The skb's `struct tcp_skb_cb` (its first two u32s: seq, end_seq).
    // SAFETY: reads 8 bytes of the kernel's sk_buff behind this program's
    // context through the fault-tolerant helper; a failed read is handled.
    let range = unsafe { bpf_probe_read_kernel(ctx.skb.skb.cast::<u8>().add(SKB_CB_OFFSET).cast::<[u32; 2]>()) };
    // SAFETY (this and the accesses to `*flow` below): see the caller; each
    // is a single aligned load or store of a field this program owns.
    let next_field = unsafe { addr_of_mut!((*flow).next_seq) };
    let Ok([seq, end_seq]) = range else {
        return Some(len);
    };
    // end_seq counts a FIN; anything else means this is not TCP's control
    // block (another kernel layout): forget the position rather than trust it.
    let span = end_seq.wrapping_sub(seq);
    if span != len && span != len.wrapping_add(1) {
        unsafe { write_volatile(next_field, 0) };
        return Some(len);
    }
    let next = unsafe { read_volatile(next_field) };
    let end = seq.wrapping_add(len);
    let known = next & SEQ_KNOWN != 0;
    // Sequence numbers wrap: compare by signed distance.
    let old = if known { (next as u32).wrapping_sub(seq) as i32 } else { 0 };
    let advanced = !known || end.wrapping_sub(next as u32) as i32 > 0;
    unsafe { write_volatile(next_field, SEQ_KNOWN | u64::from(if advanced { end } else { next as u32 })) };
    if old <= 0 {
        return Some(len);
    }
    let old = (old as u32).min(len);
    if !trim_front(ctx, old) {
        // New bytes behind old ones that cannot be cut off: dropping them
        // leaves a hole, sending them sends the old ones twice. Either way
        // the stream is wrong; userspace resets the connection.
        unsafe { write_volatile(addr_of_mut!((*flow).broken), 1) };
        return None;
    }
    let trimmed = unsafe { read_volatile(addr_of!((*flow).trimmed)) };
    unsafe { write_volatile(addr_of_mut!((*flow).trimmed), trimmed + u64::from(old)) };
    // All old: the now empty skb is dropped (and leaves copied_seq alone).
    if old == len { None } else { Some(len - old) }
}

/// Removes the first `n` bytes of the skb.
#[inline(always)]
fn trim_front(ctx: &SkBuffContext, mut n: u32) -> bool {
    for _ in 0..TRIM_CALLS {
        if n == 0 {
            return true;
        }
        let step = n.min(ADJUST_ROOM_MAX);
        // Mode 0 (BPF_ADJ_ROOM_NET) and no flags: the only form an sk_skb takes.
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return false;
        }
        n -= step;
    }
    n == 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}

//! konduit's kernel data plane: joins two stream sockets so that every byte
//! received on one is sent out of the other without entering userspace.
//!
//! Owns only the per-skb decision and the byte counter. Userspace
//! (`proxy-user/src/dataplane/sockmap.rs`) owns everything else: which sockets
//! enter the maps and when, the rule-5 kick after an insert, EOF, drain,
//! half-close and removal. Rule numbers are those of SOCKMAP-NOTES.md.
#![no_std]
#![no_main]

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::{map, stream_verdict};
use aya_ebpf::maps::{HashMap, SockHash};
use aya_ebpf::programs::SkBuffContext;

/// Spliced connections a node holds at once (two sockets each).
const MAX_SPLICED_SOCKETS: u32 = 65_536;
/// Allocate hash elements on insert instead of the whole table at load (BPF_F_NO_PREALLOC).
const BPF_F_NO_PREALLOC: u32 = 1;

/// Each spliced socket, stored under its *peer's* socket cookie, so the
/// verdict of a socket finds where to send with its own cookie as the key.
/// Userspace inserts the side that does not speak first (the backend) first.
#[map]
static PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);

/// Bytes redirected away from a socket, keyed by that socket's cookie.
/// Userspace creates each entry (at 0) before the socket enters `PEERS` and
/// deletes it at removal; the program only adds to an existing entry, so a
/// late skb can never recreate one and leak it.
#[map]
static SPLICED_BYTES: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, BPF_F_NO_PREALLOC);

/// Runs for every skb a socket in `PEERS` receives (attached to the map as
/// its stream verdict) and redirects it to the egress of the socket's peer.
#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
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
    // Redirect to the egress (flags 0, not BPF_F_INGRESS) of the entry keyed
    // by our own cookie: our peer. The helper answers SK_PASS when it found
    // the peer (the kernel then queues the skb on the peer's psock and a
    // kernel worker sends it, rule 2), SK_DROP when there is none.
    let verdict = PEERS.redirect_skb(&ctx, &mut cookie, 0) as u32;
    if verdict == SK_PASS
        && let Some(total) = SPLICED_BYTES.get_ptr_mut(cookie)
    {
        // For TCP every verdict of one socket runs under that socket's lock
        // (softirq, or the recvmsg kick of rule 5), so nothing else writes
        // this entry and userspace only reads it. (The target has no atomic
        // read-modify-write in core; recheck this before splicing unix sockets,
        // whose verdict runs in the sender's context.)
        // SAFETY: the pointer comes from a successful map lookup and the
        // entry is a plain u64 that only this socket's verdict writes.
        unsafe { *total += u64::from(len) };
    }
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}

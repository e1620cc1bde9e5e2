//! Free TCP ports for konduit's listeners. konduit (like stock Konnectivity)
//! refuses ports in the ephemeral range (> 49151), so binding port 0 is no
//! use: this picks random ports in 20000–45000, checks each is free by binding
//! it on 127.0.0.1, and never hands the same port out twice in one process.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const LOW: u16 = 20000;
const HIGH: u16 = 45000;

struct Picker {
    given: HashSet<u16>,
    state: u64,
}

static PICKER: Mutex<Option<Picker>> = Mutex::new(None);

/// A port in 20000–45000 that was free a moment ago and that this process has not handed
/// out before. Panics if none is found (the machine is out of ports).
pub fn free_port() -> u16 {
    let mut guard = PICKER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let picker = guard.get_or_insert_with(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Picker {
            given: HashSet::new(),
            // Different test processes start at different places in the range.
            state: (nanos as u64) ^ (u64::from(std::process::id()) << 32),
        }
    });
    for _ in 0..10_000 {
        picker.state = crate::data::splitmix64(picker.state);
        let port = LOW + (picker.state % u64::from(HIGH - LOW)) as u16;
        if picker.given.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            picker.given.insert(port);
            return port;
        }
    }
    panic!("no free TCP port in {LOW}-{HIGH}");
}

/// `n` distinct free ports.
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

//! The workloads, run through any [`Gateway`]: bulk transfers (every byte
//! checked where it lands; a wrong byte is an error), request/response
//! round trips, tunnel set-up rate, and holding many tunnels open.
//! They measure wall time only; CPU and memory are sampled around them.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::backends::{BulkRequest, CHUNK, Direction, Evidence, VERDICT_LEN, decode_verdict, take_upload_evidence};
use super::gateway::{Gateway, Target, Tunnel};
use super::pattern::Pattern;

/// A transfer whose bytes arrived wrong: the run must fail, never report a number.
#[derive(Debug, thiserror::Error)]
#[error("byte mismatch: {direction:?} of {len} bytes (seed {seed}) differs at offset {offset}; {evidence}")]
pub struct IntegrityError {
    pub direction: Direction,
    pub len: u64,
    pub seed: u64,
    pub offset: u64,
    /// Where the wrong bytes came from (see `Pattern::origins`).
    pub evidence: String,
}

/// Moves `len` pattern bytes one way through a new tunnel; returns the time
/// from the request to the last byte checked.
pub async fn bulk(gateway: &Gateway, direction: Direction, len: u64, seed: u64) -> anyhow::Result<Duration> {
    let mut tunnel = gateway.open(Target::Bulk).await.context("open bulk tunnel")?;
    let request = BulkRequest { direction, len, seed };
    let pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    tunnel.write_all(&request.encode()).await?;
    match direction {
        Direction::Upload => {
            let mut offset = 0u64;
            while offset < len {
                let n = (len - offset).min(CHUNK as u64) as usize;
                pattern.fill(offset, &mut buf[..n]);
                tunnel.write_all(&buf[..n]).await.with_context(|| format!("upload at offset {offset}"))?;
                offset += n as u64;
            }
            tunnel.flush().await?;
            let mut verdict = [0u8; VERDICT_LEN];
            tunnel.read_exact(&mut verdict).await.context("read the sink's verdict")?;
            if let Err(offset) = decode_verdict(&verdict) {
                let evidence = take_upload_evidence(seed).unwrap_or_else(|| "the sink kept no evidence".into());
                return Err(IntegrityError { direction, len, seed, offset, evidence }.into());
            }
        }
        Direction::Download => {
            let mut offset = 0u64;
            while offset < len {
                let want = (len - offset).min(CHUNK as u64) as usize;
                let n = tunnel.read(&mut buf[..want]).await.with_context(|| format!("download at offset {offset}"))?;
                if n == 0 {
                    bail!("download ended after {offset} of {len} bytes");
                }
                if let Err(at) = pattern.verify(offset, &buf[..n]) {
                    let evidence = download_evidence(&mut tunnel, &pattern, at, offset, &buf[..n]).await;
                    return Err(IntegrityError { direction, len, seed, offset: at, evidence }.into());
                }
                offset += n as u64;
            }
        }
    }
    let elapsed = started.elapsed();
    let _ = tunnel.shutdown().await;
    Ok(elapsed)
}

/// Reads on after a wrong byte (for a few seconds at most) to say where the
/// received bytes came from.
async fn download_evidence(tunnel: &mut Tunnel, pattern: &Pattern, bad: u64, offset: u64, chunk: &[u8]) -> String {
    let mut evidence = Evidence::default();
    evidence.keep(bad, offset, chunk);
    let mut offset = offset + chunk.len() as u64;
    let mut buf = vec![0u8; CHUNK];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !evidence.is_full() {
        match tokio::time::timeout_at(deadline, tunnel.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                evidence.keep(bad, offset, &buf[..n]);
                offset += n as u64;
            }
            _ => break,
        }
    }
    evidence.describe(pattern)
}

/// `streams` concurrent bulk transfers of `total / streams` bytes each, even
/// ones uploading and odd ones downloading; returns the wall time of all.
pub async fn parallel(gateway: &Gateway, streams: usize, total: u64, seed: u64) -> anyhow::Result<Duration> {
    let each = total / streams as u64;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..streams {
        let gateway = gateway.clone();
        let direction = if i % 2 == 0 { Direction::Upload } else { Direction::Download };
        set.spawn(async move { bulk(&gateway, direction, each, seed.wrapping_add(i as u64)).await });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

/// `warmup + count` round trips of a `size`-byte message on one tunnel; returns
/// the round-trip times (nanoseconds) of the last `count`, in order.
pub async fn request_response(gateway: &Gateway, size: usize, warmup: usize, count: usize) -> anyhow::Result<Vec<u64>> {
    let mut tunnel = gateway.open(Target::Echo).await.context("open echo tunnel")?;
    let mut request = vec![0u8; size];
    let mut reply = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        request[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let started = Instant::now();
        tunnel.write_all(&request).await?;
        tunnel.read_exact(&mut reply).await.with_context(|| format!("echo reply {i}"))?;
        let rtt = started.elapsed();
        if reply != request {
            bail!("echo reply {i} differs from its request");
        }
        if i >= warmup {
            samples.push(rtt.as_nanos() as u64);
        }
    }
    let _ = tunnel.shutdown().await;
    Ok(samples)
}

/// One tunnel's whole life: open, one byte each way, close.
async fn one_tunnel(gateway: &Gateway) -> anyhow::Result<()> {
    let mut tunnel = gateway.open(Target::OneByte).await?;
    tunnel.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    tunnel.read_exact(&mut byte).await?;
    if &byte != b"x" {
        bail!("one-byte server answered {byte:?}");
    }
    let _ = tunnel.shutdown().await;
    Ok(())
}

/// Tunnels completed by `concurrency` workers in `duration`.
#[derive(Debug, Clone)]
pub struct TunnelRate {
    pub completed: u64,
    pub failed: u64,
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl TunnelRate {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Opens, uses and closes tunnels back to back from `concurrency` workers for
/// `duration`; stops early when more than 100 fail.
pub async fn tunnel_rate(gateway: &Gateway, concurrency: usize, duration: Duration) -> anyhow::Result<TunnelRate> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let gateway = gateway.clone();
        set.spawn(async move {
            let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline && failed <= 100 / concurrency as u64 {
                match tokio::time::timeout(Duration::from_secs(10), one_tunnel(&gateway)).await {
                    Ok(Ok(())) => ok += 1,
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                    Err(_) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| "tunnel took over 10 s".to_owned());
                    }
                }
            }
            (ok, failed, first_error)
        });
    }
    let mut rate = TunnelRate { completed: 0, failed: 0, elapsed: Duration::ZERO, first_error: None };
    while let Some(done) = set.join_next().await {
        let (ok, failed, first_error) = done?;
        rate.completed += ok;
        rate.failed += failed;
        if rate.first_error.is_none() {
            rate.first_error = first_error;
        }
    }
    rate.elapsed = started.elapsed();
    Ok(rate)
}

/// Opens tunnels (one byte each way, then held) until `held` has `target`
/// of them, `concurrency` at a time.
pub async fn hold_open(
    gateway: &Gateway,
    held: &mut Vec<Tunnel>,
    target: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut set = JoinSet::new();
    let mut started = held.len();
    let open = |gateway: Gateway| async move {
        let mut tunnel = gateway.open(Target::OneByte).await?;
        tunnel.write_all(b"h").await?;
        let mut byte = [0u8; 1];
        tunnel.read_exact(&mut byte).await?;
        anyhow::Ok(tunnel)
    };
    while started < target.min(held.len() + concurrency) {
        set.spawn(tokio::time::timeout(Duration::from_secs(20), open(gateway.clone())));
        started += 1;
    }
    while let Some(done) = set.join_next().await {
        let tunnel = done?.context("opening a held tunnel took over 20 s")??;
        held.push(tunnel);
        if started < target {
            set.spawn(tokio::time::timeout(Duration::from_secs(20), open(gateway.clone())));
            started += 1;
        }
    }
    Ok(())
}

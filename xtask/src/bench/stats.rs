//! Statistics over repetitions and latency samples: median, spread, percentiles
//! and ratios. Pure: numbers in, numbers out.

use serde::Serialize;

/// One metric over the repetitions of a run: the median and the spread.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// First and third quartile (linear interpolation).
    pub q1: f64,
    pub q3: f64,
    /// How many samples (repetitions) this summarises.
    pub n: usize,
}

/// Median, quartiles and extremes of `samples`; `None` when there are none
/// (or any is NaN, which would make the order meaningless).
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Summary {
        median: quantile(&sorted, 0.5),
        min: sorted[0],
        max: sorted[sorted.len() - 1],
        q1: quantile(&sorted, 0.25),
        q3: quantile(&sorted, 0.75),
        n: sorted.len(),
    })
}

/// The `q`-quantile (0..=1) of sorted samples, interpolating between neighbours.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        len => {
            let pos = q.clamp(0.0, 1.0) * (len - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// The nearest-rank percentile (`p` in 0..=100) of sorted latency samples: the
/// smallest sample that at least `p` percent of the samples do not exceed.
pub fn percentile_nearest_rank(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `value / baseline`, when both are finite and the baseline is positive.
pub fn ratio(value: f64, baseline: f64) -> Option<f64> {
    (value.is_finite() && baseline.is_finite() && baseline > 0.0).then(|| value / baseline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(summarize(&[3.0, 1.0, 2.0]).map(|s| s.median), Some(2.0));
        assert_eq!(summarize(&[4.0, 1.0, 3.0, 2.0]).map(|s| s.median), Some(2.5));
    }

    #[test]
    fn spread_reports_extremes_and_quartiles() {
        let s = summarize(&[5.0, 1.0, 9.0, 3.0, 7.0]).expect("summary");
        assert_eq!((s.min, s.max, s.n), (1.0, 9.0, 5));
        assert_eq!((s.q1, s.q3), (3.0, 7.0));
    }

    #[test]
    fn nothing_to_summarise_gives_none() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_nearest_rank(&sorted, 50.0), Some(50));
        assert_eq!(percentile_nearest_rank(&sorted, 99.0), Some(99));
        assert_eq!(percentile_nearest_rank(&sorted, 100.0), Some(100));
        assert_eq!(percentile_nearest_rank(&sorted, 0.0), Some(1));
        assert_eq!(percentile_nearest_rank(&[7], 99.0), Some(7));
        assert_eq!(percentile_nearest_rank(&[], 50.0), None);
    }

    #[test]
    fn ratio_needs_a_positive_baseline() {
        assert_eq!(ratio(3.0, 4.0), Some(0.75));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }
}

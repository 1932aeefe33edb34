//! Quantiles of measured samples, shared by the latency client, the
//! punch-timing suite and the load generator; and the range of counts a
//! random process may give, for checks on the link emulator.

/// The `p` quantile (0..=1) of already sorted values (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The smallest and largest count of `n` trials with probability `p` each
/// that are not rarer than `tail` on their side: fewer than `low` or more
/// than `high` happens with probability at most `tail` each way.
///
/// Exact, not the normal approximation: with a small expected count the
/// binomial is skewed, and a ±4σ band around 10 of 500 (a false alarm
/// "1 in 15,000") really fails about 1 in 10,000 on its upper side alone,
/// as a CI run did with 23 of 500 lost at 1.99 %.
pub fn binomial_band(n: u32, p: f64, tail: f64) -> (u32, u32) {
    let p = p.clamp(0.0, 1.0);
    if p == 0.0 {
        return (0, 0);
    }
    if p == 1.0 {
        return (n, n);
    }
    // Each count's probability in log space, so that (1 - p)^n cannot
    // underflow for a large n.
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut ln_pmf = Vec::with_capacity(n as usize + 1);
    let mut ln = f64::from(n) * lq;
    for k in 0..=n {
        ln_pmf.push(ln);
        ln += (f64::from(n - k)).ln() - f64::from(k + 1).ln() + lp - lq;
    }
    let pmf: Vec<f64> = ln_pmf.iter().map(|l| l.exp()).collect();
    let mut low = 0;
    let mut below = 0.0;
    while low < n && below + pmf[low as usize] <= tail {
        below += pmf[low as usize];
        low += 1;
    }
    let mut high = n;
    let mut above = 0.0;
    while high > low && above + pmf[high as usize] <= tail {
        above += pmf[high as usize];
        high -= 1;
    }
    (low, high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_band_matches_exact_tails() {
        // Values from summing the binomial's terms exactly (Python's
        // math.comb) for the lab's lossy round trips.
        assert_eq!(binomial_band(500, 0.0199, 1e-6), (0, 28));
        assert_eq!(binomial_band(500, 0.0199, 1e-4), (1, 23));
        assert_eq!(binomial_band(1000, 0.0199, 1e-6), (3, 44));
        assert_eq!(binomial_band(1000, 0.0394, 1e-6), (14, 72));
    }

    #[test]
    fn binomial_band_edges() {
        assert_eq!(binomial_band(100, 0.0, 1e-6), (0, 0));
        assert_eq!(binomial_band(100, 1.0, 1e-6), (100, 100));
        // A large n with a high p does not underflow into nonsense.
        let (low, high) = binomial_band(5000, 0.9, 1e-6);
        assert!(low < 4500 && high > 4500 && high < 5000, "{low}..{high}");
    }
}

//! A Ketama-style hash ring: virtual nodes in proportion to weight, found by
//! binary search.

use std::fmt::{self, Display};

use super::core::hash_bytes;
use crate::discover::DEFAULT_WEIGHT;

/// At most this many points per endpoint, whatever its weight.
pub(super) const MAX_POINTS_PER_ENDPOINT: u64 = 1 << 16;

/// The points of every endpoint, sorted; `owners[i]` owns `points[i]`.
pub(super) struct Ring<K> {
    points: Vec<u64>,
    owners: Vec<u32>,
    members: Vec<K>,
}

impl<K> Default for Ring<K> {
    fn default() -> Self {
        Ring {
            points: Vec::new(),
            owners: Vec::new(),
            members: Vec::new(),
        }
    }
}

/// How many points an endpoint of `weight` has: `virtual_nodes` for the
/// default weight (100), in proportion otherwise, at least one for any
/// weight, none for 0.
pub(super) fn points_for(weight: u32, virtual_nodes: u32) -> u64 {
    if weight == 0 {
        return 0;
    }
    let scaled = (u64::from(virtual_nodes) * u64::from(weight) + u64::from(DEFAULT_WEIGHT) / 2)
        / u64::from(DEFAULT_WEIGHT);
    scaled.clamp(1, MAX_POINTS_PER_ENDPOINT)
}

/// splitmix64's output function: the `i`th point of an endpoint whose name
/// hashes to `base`.
#[inline]
fn point(base: u64, i: u64) -> u64 {
    let mut z = base.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl<K: Clone + Display> Ring<K> {
    /// Builds the ring of `members` (key and weight).
    ///
    /// An endpoint's points depend only on its key's `Display` form and its
    /// weight, so every process with the same endpoints builds the same ring,
    /// and adding or removing an endpoint adds or removes only its own points.
    pub(super) fn build<'a, I>(members: I, virtual_nodes: u32) -> Self
    where
        I: IntoIterator<Item = (&'a K, u32)>,
        K: 'a,
    {
        let mut keys = Vec::new();
        let mut all: Vec<(u64, u64, u32)> = Vec::new();
        for (key, weight) in members {
            let owner = keys.len() as u32;
            let base = hash_bytes(key.to_string().as_bytes());
            let n = points_for(weight, virtual_nodes);
            all.extend((0..n).map(|i| (point(base, i), base, owner)));
            keys.push(key.clone());
        }
        // Sorting by (point, name hash) makes the order independent of the
        // order of `members` (a hash map's).
        all.sort_unstable();
        Ring {
            points: all.iter().map(|p| p.0).collect(),
            owners: all.iter().map(|p| p.2).collect(),
            members: keys,
        }
    }
}

impl<K> Ring<K> {
    /// The number of points.
    #[inline]
    pub(super) fn len(&self) -> usize {
        self.points.len()
    }

    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The first point at or after `hash`, wrapping around (the ring must not
    /// be empty).
    #[inline]
    pub(super) fn position(&self, hash: u64) -> usize {
        let i = self.points.partition_point(|&p| p < hash);
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    /// The owner of the point at `position` (below `len`).
    #[inline]
    pub(super) fn owner(&self, position: usize) -> (u32, &K) {
        let owner = self.owners[position];
        (owner, &self.members[owner as usize])
    }

    /// The owner of `hash` when every endpoint is ready.
    #[cfg(test)]
    pub(super) fn lookup(&self, hash: u64) -> Option<&K> {
        if self.is_empty() {
            return None;
        }
        Some(self.owner(self.position(hash)).1)
    }

    /// The endpoints on the ring (with points or not).
    pub(super) fn members(&self) -> usize {
        self.members.len()
    }
}

impl<K> fmt::Debug for Ring<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("endpoints", &self.members.len())
            .field("points", &self.points.len())
            .finish()
    }
}

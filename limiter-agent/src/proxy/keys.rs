//! Which bucket a keyed request counts in: a verified key's own, or its
//! address's; and what the upstream's answer teaches about the key.

use std::{hash::BuildHasher as _, net::IpAddr, time::Duration};

use http::StatusCode;

use super::{Proxy, State, TierState};
use crate::{
    config::KeyVerification,
    identity::{Identity, Requester},
    limit::{Algorithm, Ask, Spend},
};

/// How long a verification read from the shared store is trusted locally
/// before the store is asked again.
const SHARED_VERIFICATION_MS: u64 = 60_000;

/// What the upstream's answer may teach about the request's key.
pub(super) enum KeyCheck {
    /// No key, or one whose standing does not depend on the upstream.
    None,
    /// Charged to the address; a 2xx may verify it.
    Unverified { entry: u64, key: String, ip: IpAddr },
    /// Its own bucket; a 2xx keeps it verified (within the address's
    /// budget), a 401 revokes it.
    Verified { entry: u64, key: String, ip: IpAddr },
}

impl Proxy {
    /// The bucket identity: a verified key (or any key with `verify_keys =
    /// "none"`) is its own bucket; an unverified key is charged to the client
    /// address, so random keys cannot mint quota. Verification is per tier:
    /// an endpoint that accepts any key (a health check) verifies nothing for
    /// the others. A CORS preflight (`OPTIONS`) is answered before any
    /// authentication, so it never verifies a key.
    pub(super) async fn identify(
        &self,
        state: &State,
        client: Requester,
        tier: &TierState,
        preflight: bool,
        now_ms: u64,
    ) -> (Identity, KeyCheck) {
        let Some(key) = client.key else {
            return (Identity::Ip(client.ip), KeyCheck::None);
        };
        match state.config.live.verify_keys {
            KeyVerification::Off => return (Identity::Key(key), KeyCheck::None),
            _ if state.config.live.keys.contains_key(&key)
                || self.runtime.load().overrides.contains_key(&key) =>
            {
                return (Identity::Key(key), KeyCheck::None);
            }
            KeyVerification::Config => return (Identity::Ip(client.ip), KeyCheck::None),
            KeyVerification::Upstream => {}
        }
        let entry = self.hasher.hash_one((&key, tier.hash));
        let verified = self.verified.contains(entry, now_ms) || {
            let shared = self.store.key_verified(&tier.id, &key).await;
            if shared {
                // Briefly: a revocation on another host deletes only the shared record.
                self.verified
                    .insert_for(entry, now_ms, SHARED_VERIFICATION_MS);
            }
            shared
        };
        let ip = client.ip;
        if verified {
            (
                Identity::Key(key.clone()),
                KeyCheck::Verified { entry, key, ip },
            )
        } else if preflight {
            (Identity::Ip(ip), KeyCheck::None)
        } else {
            (Identity::Ip(ip), KeyCheck::Unverified { entry, key, ip })
        }
    }

    /// What the upstream's answer says about keys on this tier. A 401 or 403
    /// shows the tier authenticates; a 401 revokes the key. A 2xx verifies the
    /// key only on a tier seen authenticating within `verified_key_ttl` (an
    /// endpoint that serves anyone proves nothing about a key), and only within
    /// the address's budget per tier per `verified_key_ttl` (the tier's limit),
    /// which verifications and renewals both spend, so one address cannot keep
    /// more than that many keys verified. Redirects, 404s and other answers may
    /// come before authentication: they say nothing.
    pub(super) async fn learn(
        &self,
        state: &State,
        tier: &TierState,
        check: KeyCheck,
        status: StatusCode,
    ) {
        let refused = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
        if matches!(check, KeyCheck::None) && !refused {
            // Nothing to learn: the common request, which reads no clock.
            return;
        }
        let now = self.clock.now_ms();
        let ttl = state.config.startup.verified_key_ttl;
        if refused {
            self.authenticating.mark(tier.authenticates, now);
        }
        match check {
            KeyCheck::Unverified { entry, key, ip }
                if status.is_success()
                    && self.authenticating.contains(tier.authenticates, now)
                    && self.verification_budget(tier, ip, ttl, now).await =>
            {
                self.verified.insert(entry, now);
                self.store.share_verification(&tier.id, &key, Some(ttl));
            }
            KeyCheck::Verified { entry, key, ip }
                if status.is_success()
                    && self.verified.renewal_due(entry, now)
                    && self.verification_budget(tier, ip, ttl, now).await =>
            {
                self.verified.insert(entry, now);
                self.store.share_verification(&tier.id, &key, Some(ttl));
            }
            KeyCheck::Verified { entry, key, .. } if status == StatusCode::UNAUTHORIZED => {
                self.verified.remove(entry);
                self.store.share_verification(&tier.id, &key, None);
            }
            _ => {}
        }
    }

    /// Charges one verification or renewal to the address in this tier; false
    /// once the address has spent the tier's limit of them this TTL.
    async fn verification_budget(
        &self,
        tier: &TierState,
        ip: IpAddr,
        ttl: Duration,
        now_ms: u64,
    ) -> bool {
        let identity = Identity::Ip(ip);
        let ask = Ask {
            key: self.bucket(&identity, tier.authenticates),
            tier: &tier.verify_id,
            identity: &identity,
            limit: tier.limit,
            hits: 1,
            window_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            spend: Spend::Admit,
            algorithm: Algorithm::Fixed,
        };
        matches!(self.store.decide(ask, now_ms).await, Ok(d) if d.allowed)
    }
}

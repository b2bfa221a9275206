//! Sources the per-source map does not hold: the per-CPU budgets they spend
//! (new sources, challenge admissions, promotions, SYN-ACKs), the SYN
//! challenge that lets them in during a flood, and probation, where the
//! challenge puts them until an established connection shows they are real
//! clients. The design is in `limiter_common::challenge`.

use aya_ebpf::programs::XdpContext;
use limiter_common::{
    NewSources, PROBATION_MAX_PACKETS, PROBATION_MAX_SYNS, ProgramConfig, SourceKey, SourceState,
    reason, verdict,
};

use crate::{
    NEW_SOURCES, PROBATION, SOURCES, account, challenge, enforce, lookup, now_ns,
    parse::{Source, TCP_RST, parse},
    refresh_policy, source_key,
};

/// This CPU's budgets, the window rolled forward to `now` first.
#[inline(always)]
fn budgets(config: &ProgramConfig, now: u64) -> Option<&'static mut NewSources> {
    let budget = NEW_SOURCES.get_ptr_mut(0)?;
    // SAFETY: the pointer comes from a successful lookup of a per-CPU slot:
    // live, this CPU's own, and XDP does not preempt itself, so this is the
    // only reference to it while the program runs.
    let budget = unsafe { &mut *budget };
    let elapsed = now.wrapping_sub(budget.window_start_ns);
    if elapsed >= config.window_ns {
        // Flooded when the window just ended (not an older one) went over.
        budget.flooded =
            u32::from(elapsed < 2 * config.window_ns && budget.count > config.max_new_sources);
        budget.window_start_ns = now;
        budget.count = 0;
        budget.admitted = 0;
        budget.promoted = 0;
    }
    Some(budget)
}

/// Takes one unit of this CPU's new-source budget for the current window;
/// false when it is spent, or when a flood is on and `challenge` (with the
/// challenge on, sources get in during a flood only through it).
#[inline(always)]
pub fn admit_new_source(config: &ProgramConfig, challenge: bool) -> bool {
    if config.max_new_sources == 0 {
        return true;
    }
    let Some(budget) = budgets(config, now_ns(config)) else {
        return true;
    };
    budget.count = budget.count.saturating_add(1);
    if challenge && budget.flooded != 0 {
        return false;
    }
    budget.count <= config.max_new_sources
}

/// A packet of a source in probation: counted against the ceilings like a
/// known source's and against probation's own, tighter ones; a SYN passed
/// to the kernel takes a token of the SYN-ACK cap (the kernel answers it);
/// and when it belongs to an established connection (and this CPU's
/// promotion budget allows) the source is moved to the per-source map.
#[inline(always)]
pub fn on_probation(
    ctx: &XdpContext,
    config: &ProgramConfig,
    state: &mut SourceState,
    key: &SourceKey,
    syn: bool,
    passed: u32,
) -> (u32, u32) {
    // Outside a flood a source needs no proof to get an entry: one left in
    // probation by a flood graduates as any new source would (clients whose
    // sockets the lookup can't see, behind DNAT, are not held to probation's
    // ceilings once the flood is over).
    let now = now_ns(config);
    if budgets(config, now).is_some_and(|b| b.flooded == 0) && admit_new_source(config, true) {
        let mut graduated = *state;
        let reason = account(config, &mut graduated, key, syn);
        let _ = SOURCES.insert(key, graduated, 0);
        let _ = PROBATION.remove(key);
        return if reason == reason::API {
            (verdict::PASS, reason::PROMOTED)
        } else {
            enforce(config, reason)
        };
    }
    let reason = account(config, state, key, syn);
    if reason != reason::API {
        return enforce(config, reason);
    }
    if syn {
        if state.syns > PROBATION_MAX_SYNS {
            return enforce(config, reason::SYN_CEILING);
        }
        if let Some(budget) = budgets(config, now)
            && !budget.take_syn_ack(now, config.max_syn_acks, config.window_ns)
        {
            return enforce(config, reason::SYN_ACK_CAP);
        }
        return (verdict::PASS, passed);
    }
    if state.packets > PROBATION_MAX_PACKETS {
        return enforce(config, reason::PACKET_CEILING);
    }
    let mut src = Source::default();
    let _ = parse(ctx, config, &mut src);
    if src.tcp_flags & TCP_RST == 0 && lookup::established(ctx, &src) && take_promotion(config) {
        let promoted = *state;
        // Inserted first: a source is never in neither map.
        let _ = SOURCES.insert(key, promoted, 0);
        let _ = PROBATION.remove(key);
        return (verdict::PASS, reason::PROMOTED);
    }
    (verdict::PASS, passed)
}

/// One unit of this CPU's promotion budget (the new-source budget's size).
#[inline(always)]
fn take_promotion(config: &ProgramConfig) -> bool {
    if config.max_new_sources == 0 {
        return true;
    }
    let Some(budget) = budgets(config, now_ns(config)) else {
        return true;
    };
    if budget.promoted >= config.max_new_sources {
        return false;
    }
    budget.promoted += 1;
    true
}

/// A packet of a source the map does not hold, to an API port, while the
/// new-source budget is spent: its SYN is answered with the challenge
/// (within the SYN-ACK cap, to an address a reply may go to, by the way a
/// reply would go), its RST with a valid cookie admits it to probation
/// (within the admission budget), anything else is dropped at the
/// new-source ceiling.
#[inline(always)]
pub fn challenge_unknown(ctx: &XdpContext, config: &ProgramConfig, syn: bool) -> (u32, u32) {
    // Parsed again rather than carried: kept live across the per-source
    // lookup, the parser's findings cost every known source's packet.
    let mut src = Source::default();
    let _ = parse(ctx, config, &mut src);
    let src = &src;
    let now = now_ns(config);
    let Some(budget) = budgets(config, now) else {
        return (verdict::DROP, reason::NEW_SOURCE_CEILING);
    };
    if syn {
        if challenge::martian(ctx, src) {
            return (verdict::DROP, reason::MARTIAN_SOURCE);
        }
        if !budget.syn_ack_ready(now, config.max_syn_acks, config.window_ns) {
            return (verdict::DROP, reason::SYN_ACK_CAP);
        }
        let mut macs = [[0u8; 6]; 2];
        let hop = lookup::next_hop(ctx, src, &mut macs);
        if hop == lookup::HOP_NONE {
            return (verdict::DROP, reason::NO_RETURN_PATH);
        }
        if challenge::answer(ctx, config, src, now, hop, &macs).is_some() {
            budget.spend_syn_ack(config.max_syn_acks);
            return (verdict::TX, reason::SYN_CHALLENGE);
        }
    } else if src.tcp_flags & TCP_RST != 0 && challenge::passed(ctx, config, src, now) {
        if config.max_challenge_admissions != 0
            && budget.admitted >= config.max_challenge_admissions
        {
            return (verdict::DROP, reason::CHALLENGE_BUDGET);
        }
        budget.admitted += 1;
        let key = source_key(config, src);
        let mut state = SourceState::default();
        refresh_policy(config, &mut state, &key);
        let _ = PROBATION.insert(key, state, 0);
        return (verdict::DROP, reason::CHALLENGE_PASSED);
    }
    (verdict::DROP, reason::NEW_SOURCE_CEILING)
}

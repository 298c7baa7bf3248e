package redlatch

import (
	"context"
	"sync"
	"time"
)

// ReentrantMutex is a distributed lock that its owner may hold several
// times. One Redis hash per lock records the owner and its hold count: each
// Lock by the owner increments the count, each Unlock decrements it, and the
// lock is released when the count reaches zero. The fencing token stays the
// same for all the holds of one owner.
//
// Ownership belongs to the handle, or to its WithOwner id: handles with the
// same owner id, in this process or others, share the holds, so one can
// re-enter or release what another took. Goroutines sharing one handle share
// its ownership too (unlike sync.Mutex, a second Lock does not wait).
//
// The watchdog renews the lock until the last Unlock: a hold of 2 unlocked
// once is still renewed.
type ReentrantMutex struct {
	e excl

	mu    sync.Mutex
	h     *hold // the hold this handle tracks
	n     int   // holds taken through this handle and not yet released
	token int64
	// reqs: the request ids of this handle's acquisitions of the hold it
	// tracks whose replies came and that no Unlock has named yet (see
	// excl.unlockDone).
	reqs []string
	// pending counts this handle's Lock and TryLock calls under way: an
	// acquisition of theirs may be counted in Redis before its reply (see
	// Unlock).
	pending int
	// orphans counts the holds taken through this handle on a hold that an
	// Unlock found gone, whose own Unlocks have not come yet (see Unlock).
	orphans int
}

// ReentrantMutex returns a handle on the reentrant lock called name. It
// does not talk to Redis. Bad arguments are reported by the handle's methods
// as errors wrapping ErrInvalidArgument.
func (c *Client) ReentrantMutex(name string, opts ...LockOption) *ReentrantMutex {
	m := &ReentrantMutex{e: newExcl(c, name, true, opts)}
	m.e.mayReenter = m.mayReenter
	return m
}

// mayReenter reports whether an attempt of the handle may re-enter a hold
// of its owner that Redis has (see mayReenter).
func (m *ReentrantMutex) mayReenter() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return mayReenter(m.n, m.pending, m.e.shared)
}

// mayReenter reports whether an attempt of a handle may re-enter a hold of
// its owner that Redis has, given the holds the handle has (held), its
// acquisitions under way, this one included (pending), and whether its
// owner id is shared (WithOwner: another handle may hold it). It may when
// the handle holds the lock, another of its calls is under way (its hold
// may be in Redis before its reply), or the owner id is shared. A handle
// of its own owner id that holds nothing and has no other call under way
// did not take such a hold, or it ended: Redis brought it back (a restart
// from an older snapshot, a failover to a stale replica) or it awaits an
// undo or a release in flight. Re-entering it would report its old token,
// lower than tokens issued since; the attempt waits for it instead, as for
// another owner's. ReentrantMutex, FairMutex and RWMutex (writes and reads
// apart) follow this rule.
func mayReenter(held, pending int, shared bool) bool {
	return held > 0 || pending > 1 || shared
}

// Lock blocks until the owner holds the lock once more, or ctx is done. A
// failed wait returns an error matching both ErrNotObtained and ctx.Err().
func (m *ReentrantMutex) Lock(ctx context.Context) error {
	_, err := m.lock(ctx, true)
	return err
}

// TryLock makes one attempt and reports whether the owner now holds the lock
// once more; (false, nil) means another owner holds it.
func (m *ReentrantMutex) TryLock(ctx context.Context) (bool, error) {
	return m.lock(ctx, false)
}

// ex returns the handle's lock, nil for a nil handle (its check reports it).
func (m *ReentrantMutex) ex() *excl {
	if m == nil {
		return nil
	}
	return &m.e
}

func (m *ReentrantMutex) lock(ctx context.Context, block bool) (bool, error) {
	if err := m.ex().check(ctx); err != nil {
		return false, err
	}
	// Close waits for this call to give back what it took after Close
	// began (closedAfter, retake; see Client.waits).
	if !m.e.c.enterWait() {
		return false, ErrClosed
	}
	defer m.e.c.leaveWait() // after the cleanup below
	// A re-entry (this handle, or with WithOwner perhaps another handle,
	// holds the lock) attempts at once instead of queueing behind the
	// Client's waiters: they wait for this very owner.
	m.mu.Lock()
	queue := m.n == 0 && !m.e.shared
	m.pending++
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.pending--
		m.mu.Unlock()
	}()
	kin := &kinship{owner: m.e.owner, held: func() bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.n > 0
	}}
	token, sent, req, ok, err := m.e.lockReq(ctx, kin, block, queue)
	if !ok {
		return false, err
	}
	m.mu.Lock()
	if late(m.h, m.token, token) {
		// Most likely a late reply: the hold this call took ended before the
		// live hold tracked here was taken (by another goroutine's Lock on
		// this handle, whose reply came first). The attempt retake makes
		// re-enters the live hold, which counts this call in it.
		m.mu.Unlock()
		first := req
		token, sent, ok, err = retake(ctx, token,
			func(ctx context.Context) (t int64, s time.Time, ok bool, err error) {
				t, s, req, ok, err = m.e.lockReq(ctx, kin, block, false)
				return t, s, ok, err
			},
			func(ctx context.Context, t int64) { _, _ = m.e.unlockDone(ctx, m.e.owner, "", first, t, false) })
		if !ok {
			return false, err
		}
		m.mu.Lock()
	}
	var cleanup func()
	defer func() {
		if cleanup != nil {
			cleanup() // after m.mu is released
		}
	}()
	defer m.mu.Unlock()
	if m.h == nil || m.h.isLost() || token != m.token {
		// A new hold for this handle: its first, or a fresh one after its
		// previous hold was lost, or after a concurrent Unlock released it
		// (a new token: Redis took the lock anew; that Unlock, finding
		// another hold tracked, leaves it alone). The token, not the count,
		// tells: two concurrent Locks of one hold may be processed here in
		// either order. (The count may exceed 1 when another handle of the
		// same owner holds it too; each tracks the hold it took.)
		carried := m.e.c.wd.replace(m.h, m.n, token == m.token)
		if cleanup = m.e.c.closedAfter(ctx, func(ctx context.Context) {
			_, _ = m.e.unlockDone(ctx, m.e.owner, "", req, token, false)
		}); cleanup != nil {
			m.h, m.n, m.token, m.reqs = nil, 0, 0, m.reqs[:0]
			return false, ErrClosed
		}
		if carried == 0 {
			m.reqs = m.reqs[:0]
		}
		m.h, m.n = m.e.track(sent, token), carried
	} else {
		m.e.c.wd.extend(m.h, sent, m.n+1) // a re-entry restarts the lease
	}
	m.n++
	m.reqs = append(m.reqs, req)
	// The token of the hold in Redis now: a re-entry reports the token the
	// hold had; a hold taken again after a loss, a new one (Unlock names it).
	m.token = token
	// This handle's other Lock calls, and other handles of the owner on
	// this Client, may wait: they re-enter now.
	m.e.c.ps.wakeKin(m.e.channel, m.e.owner)
	return true, nil
}

// Unlock releases one hold of the owner; the last one releases the lock and
// wakes one waiter. It returns ErrNotHeld when the owner holds nothing, when
// the lease ran out, or when the hold was lost (Lost is closed).
//
// Unlock is idempotent per call: when the reply is lost and the Redis client
// retries, the retry is recognised and the count is not decremented twice.
// An Unlock whose ctx ends while it is in flight, or that fails with no
// reply from Redis (go-redis's retries failed), returns that error and
// counts as done (the handle holds one hold fewer): its release is sent
// again in the background, which Redis applies once. Do not call Unlock
// again for it.
//
// An Unlock that finds the hold gone while other holds taken through the
// handle remain (goroutines sharing it) closes Lost for them, and the next
// Unlocks of the handle, one per such hold, return ErrNotHeld and release
// nothing, even when the handle holds the lock anew meanwhile: they pair
// with the lost holds, and goroutines sharing a handle cannot be told
// apart. Were they counted against the new hold, the lost holders' Unlocks
// would release it under its holder, whose Lost stays open.
func (m *ReentrantMutex) Unlock(ctx context.Context) error {
	if err := m.ex().check(ctx); err != nil {
		return err
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	m.mu.Lock()
	if m.orphans > 0 {
		// It pairs with a hold lost before: counted against a later hold,
		// it would release that hold under its holder.
		m.orphans--
		m.mu.Unlock()
		return ErrNotHeld
	}
	h, token := m.h, m.token // no hold tracked: token 0, any hold of the owner
	// Any acquisition of the tracked hold whose reply came will do: this
	// release ends one of them, and none of them is undone or resent.
	var done string
	if h != nil && len(m.reqs) > 0 {
		done = m.reqs[len(m.reqs)-1]
		m.reqs = m.reqs[:len(m.reqs)-1]
		if m.n == 1 && m.pending == 0 && !m.e.shared {
			// The owner's only hold in Redis: the release is final, and
			// the list goes with the hold. Naming the acquisition would
			// cost the call three arguments.
			done = ""
		}
	}
	// Under m.mu, so that concurrent Unlocks count each other: with more
	// holds through this handle than releases in flight, this one leaves
	// the hold held, and its deadline still closes Lost if Redis does not
	// answer; one that may end the hold is decided by its reply.
	m.e.c.wd.setReleasingOf(h, true, m.n)
	m.mu.Unlock()
	n, err := m.e.unlockDone(ctx, m.e.owner, "", done, token, true)

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.h != h || h == nil {
		// Nothing tracked here, or a concurrent Lock replaced the hold:
		// leave the handle's state alone. A hold Lost reported lost
		// before (its deadline passed unrenewed: the master may still
		// have counted it) is not held, as below.
		if err == nil && h.isLost() {
			return ErrNotHeld
		}
		h = nil
	} else if m.n > 0 {
		m.n--
	}
	if h != nil && m.n > 0 && (n > 0 || err != nil) {
		// Still held (or unknown after an error, with holds left here):
		// keep renewing.
		m.e.c.wd.setReleasingOf(h, false, m.n)
		if err == nil && h.isLost() {
			// Lost closed before this release (a deadline passed
			// unrenewed, or renewals too few replicas acknowledged): the
			// master may still count the hold, but the handle lost it.
			return ErrNotHeld
		}
	} else if h != nil {
		// Released, not held, or unknown (an error): this handle's hold
		// ends here. Other handles of the same owner track their own.
		var lost bool
		if err == nil && n < 0 && m.n > 0 {
			// The hold is gone while holds taken through this handle are
			// not unlocked yet: unless the other releases in flight may
			// have ended it, those holds are lost (Lost closes).
			lost = m.e.c.wd.goneWhileHeld(h, m.n)
			m.orphans += m.e.c.wd.unreleased(h, m.n)
		} else {
			lost = m.e.c.wd.remove(h)
		}
		m.h, m.n, m.token, m.reqs = nil, 0, 0, m.reqs[:0]
		if lost {
			return ErrNotHeld
		}
	}
	if err != nil {
		return err
	}
	if n < 0 {
		return ErrNotHeld
	}
	return nil
}

// HoldCount returns how many times the owner holds the lock, as recorded in
// Redis (so it counts the holds of every handle sharing the owner id).
func (m *ReentrantMutex) HoldCount(ctx context.Context) (int, error) { return m.ex().holdCount(ctx) }

// Token returns the fencing token of the current hold, or 0 when the handle
// holds nothing. See Mutex.Token.
func (m *ReentrantMutex) Token() int64 {
	if m == nil {
		return 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.h.isLost() {
		return 0
	}
	return m.token
}

// Lost returns a channel closed when the current hold ends before its last
// Unlock. See Mutex.Lost.
func (m *ReentrantMutex) Lost() <-chan struct{} {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.h.lostChan()
}

func (m *ReentrantMutex) afterLost(lost <-chan struct{}, f func()) (func(), bool) {
	m.mu.Lock()
	h := m.h
	m.mu.Unlock()
	return holdAfterLost(m.e.c.wd, h, lost, f)
}

// TTL returns the remaining lease of the lock; 0 when it is free. See
// Mutex.TTL.
func (m *ReentrantMutex) TTL(ctx context.Context) (time.Duration, error) { return m.ex().ttl(ctx) }

// IsLocked reports whether anyone holds the lock.
func (m *ReentrantMutex) IsLocked(ctx context.Context) (bool, error) { return m.ex().isLocked(ctx) }

// ForceUnlock releases the lock whoever holds it, however many times, and
// wakes a waiter. It reports whether the lock was held. Resends are applied
// once, as Mutex.ForceUnlock states.
func (m *ReentrantMutex) ForceUnlock(ctx context.Context) (bool, error) {
	return m.ex().forceUnlock(ctx)
}

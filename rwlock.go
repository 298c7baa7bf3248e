package redlatch

import (
	"context"
	_ "embed"
	"fmt"
	"strings"
	"sync"
	"time"
)

var (
	//go:embed lua/rw_common.lua
	rwCommonLua string
	//go:embed lua/rw_lock.lua
	rwLockLua string
	//go:embed lua/rw_rlock.lua
	rwRLockLua string
	//go:embed lua/rw_unlock.lua
	rwUnlockLua string
	//go:embed lua/rw_runlock.lua
	rwRUnlockLua string
	//go:embed lua/rw_unqueue.lua
	rwUnqueueLua string
	//go:embed lua/rw_force_unlock.lua
	rwForceUnlockLua string
	//go:embed lua/rw_info.lua
	rwInfoLua string

	// rw_common.lua uses the release helpers.
	rwPrelude           = fenceReleaseLua + idsLua + rwCommonLua
	rwLockScript        = newScript(fenceLua + fenceAcquireLua + rwPrelude + rwLockLua)
	rwRLockScript       = newScript(fenceAcquireLua + rwPrelude + rwRLockLua)
	rwUnlockScript      = newScript(rwPrelude + rwUnlockLua)
	rwRUnlockScript     = newScript(rwPrelude + rwRUnlockLua)
	rwUnqueueScript     = newScript(rwPrelude + rwUnqueueLua)
	rwForceUnlockScript = newScript(rwPrelude + fenceForceLua + rwForceUnlockLua)
	rwInfoScript        = newScript(rwPrelude + rwInfoLua)
)

// RWMutex is a distributed readers-writer lock: any number of readers share
// it, or one writer holds it alone. Both sides are reentrant per owner (the
// handle, or its WithOwner id), like ReentrantMutex: each Lock needs one
// Unlock, each RLock one RUnlock.
//
// Lock, TryLock, Unlock, Token and Lost are the writer's; RLock, TryRLock,
// RUnlock and RLost the reader's. RLocker returns the read side as a Locker,
// for Do.
//
// Downgrade: the writer may take the read lock too. After its last write
// Unlock it still holds the read lock, and other readers may join. Upgrade,
// the reverse, is refused: Lock and TryLock by an owner holding only the read
// lock return ErrUpgrade at once, since the writer would wait for its own
// read hold forever.
//
// Writers are not starved: once a writer waits (Lock, not TryLock), new
// readers queue behind it, so a stream of overlapping readers holds it off
// for about one read hold. Owners already reading may still re-enter. A
// writer that gives up waiting lets the queued readers in.
//
// Read holds count per owner (the handle, or its WithOwner id), so
// goroutines sharing one handle whose read holds overlap keep the owner's
// count above zero, and a waiting writer never gets in. Give each
// concurrent reader its own handle (or owner id), as the guarantee above
// assumes. Likewise, concurrent Lock calls of one owner share one waiting
// place: when one of them gives up, new readers may pass the other until
// its next attempt.
//
// Every owner's read hold has a lease of its own, renewed by the watchdog
// (or fixed, with WithLease): a crashed reader frees its share when its lease
// runs out, while the other readers keep theirs. The writer's hold has its
// own lease as well. A waiting writer's place in the queue is leased too
// (the watchdog timeout, renewed while it waits), so a crashed waiting writer
// blocks new readers for at most that long.
//
// Wake-ups: the last write Unlock wakes every local reader and one local
// writer of each Client; a read unlock that leaves the lock free wakes one
// waiting writer. A lost message delays a waiter by at most the remaining
// lease of the hold in its way (see the package documentation).
//
// Keys of an RWMutex named n: the hash "{n}:rw" (writer, readers, leases,
// waiting writers, request ids) and the fence key "{n}:fence"; channels
// "{n}:rwake" (readers) and "{n}:wwake" (writers). An idle RWMutex leaves
// only its fence key.
type RWMutex struct {
	c      *Client
	name   string
	key    string
	fence  string
	rwake  string
	wwake  string
	owner  string
	lease  time.Duration
	renew  bool
	shared bool // WithOwner: other handles may hold the lock as this owner
	err    error
	wfield string // the writer's lease field in the hash
	rfield string // the reader's lease field
	qfield string // the waiting writer's place

	mu    sync.Mutex
	wh    *hold // this handle's write hold
	wn    int   // write holds taken through this handle
	token int64
	rh    *hold // this handle's read hold
	rn    int   // read holds taken through this handle
	// rbegun is the request id that began the owner's read hold tracked by
	// rh (see rw_rlock.lua): another one means a new read hold.
	rbegun string
	// wreqs, rreqs: the request ids of this handle's acquisitions of the
	// write hold wh and of the read hold rh whose replies came and that no
	// release has named yet (see ReentrantMutex.reqs, release).
	wreqs, rreqs []string
	// worphans, rorphans: write and read holds taken through this handle
	// on a hold that a release found gone, whose own Unlock or RUnlock has
	// not come yet (see ReentrantMutex.Unlock).
	worphans, rorphans int
	// wpending, rpending count this handle's write and read acquisitions
	// under way (see ReentrantMutex.pending and mayReenter).
	wpending, rpending int
	// rtaking counts this handle's read attempts whose reply has not come
	// yet, and those that took the read lock, until their RLock counts
	// them in rn: an RLock that waits (its attempts failed) holds nothing
	// (see acquireW).
	rtaking int
	// rflight counts those of rtaking whose reply has not come yet.
	rflight inFlight
}

// RWMutex returns a handle on the readers-writer lock called name. It does
// not talk to Redis. Bad arguments are reported by the handle's methods as
// errors wrapping ErrInvalidArgument.
func (c *Client) RWMutex(name string, opts ...LockOption) *RWMutex {
	o := newLockOptions(name, opts)
	m := &RWMutex{c: c, name: name, owner: o.owner, shared: o.shared, err: o.err}
	if c != nil && m.err == nil && strings.HasPrefix(name, "}") {
		m.err = invalidArg("name", "must not start with '}'")
	}
	if c != nil {
		tag := c.tag(name)
		m.key, m.fence = tag+":rw", tag+":fence"
		m.rwake, m.wwake = tag+":rwake", tag+":wwake"
		m.lease, m.renew = c.leaseFor(o)
	}
	m.wfield, m.rfield, m.qfield = "we:"+m.owner, "re:"+m.owner, "ww:"+m.owner
	return m
}

// mayReenter reports whether an attempt may re-enter a write hold (n, p:
// m.wn, m.wpending) or a read hold (m.rn, m.rpending) of the owner that
// Redis has (see mayReenter).
func (m *RWMutex) mayReenter(n, p *int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return mayReenter(*n, *p, m.shared)
}

func (m *RWMutex) check(ctx context.Context) error {
	if m == nil {
		return invalidArg("lock", "is nil")
	}
	if err := m.c.check(); err != nil {
		return err
	}
	return firstErr(m.err, ctxArg(ctx))
}

// Lock blocks until the owner holds the write lock once more, or ctx is
// done. A failed wait returns an error matching both ErrNotObtained and
// ctx.Err(). It returns ErrUpgrade at once when the owner holds the read
// lock but not the write lock.
func (m *RWMutex) Lock(ctx context.Context) error {
	_, err := m.lock(ctx, true)
	return err
}

// TryLock makes one attempt at the write lock; (false, nil) means another
// owner holds the lock (reading or writing). It does not queue: readers are
// not held back by a TryLock. It returns ErrUpgrade when the owner holds the
// read lock but not the write lock.
func (m *RWMutex) TryLock(ctx context.Context) (bool, error) {
	return m.lock(ctx, false)
}

func (m *RWMutex) lock(ctx context.Context, block bool) (bool, error) {
	if err := m.check(ctx); err != nil {
		return false, err
	}
	// Close waits for this call to leave the writers' queue (see
	// Client.waits).
	if !m.c.enterWait() {
		return false, ErrClosed
	}
	defer m.c.leaveWait()
	m.mu.Lock()
	m.wpending++
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.wpending--
		m.mu.Unlock()
	}()
	token, sent, req, ok, err := m.acquireW(ctx, block)
	if !ok {
		return false, err
	}
	m.mu.Lock()
	if late(m.wh, m.token, token) { // see ReentrantMutex.lock
		m.mu.Unlock()
		first := req
		token, sent, ok, err = retake(ctx, token,
			func(ctx context.Context) (t int64, s time.Time, ok bool, err error) {
				t, s, req, ok, err = m.acquireW(ctx, block)
				return t, s, ok, err
			},
			func(ctx context.Context, t int64) { _, _ = m.unlockW(ctx, "", tokenArg(t), first) })
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
	if m.wh == nil || m.wh.isLost() || token != m.token { // see ReentrantMutex.lock
		carried := m.c.wd.replace(m.wh, m.wn, token == m.token)
		if cleanup = m.c.closedAfter(ctx, func(ctx context.Context) {
			_, _ = m.unlockW(ctx, "", tokenArg(token), req)
		}); cleanup != nil {
			m.wh, m.wn, m.token, m.wreqs = nil, 0, 0, m.wreqs[:0]
			return false, ErrClosed
		}
		kind, member := rwHold(m.wfield, tokenArg(token))
		if carried == 0 {
			m.wreqs = m.wreqs[:0]
		}
		m.wh, m.wn = m.c.wd.add(m.name, m.key, kind, member, m.lease, m.renew, sent), carried
	} else {
		m.c.wd.extend(m.wh, sent, m.wn+1) // see ReentrantMutex.lock
	}
	m.wn++
	m.wreqs = append(m.wreqs, req)
	// The token of the hold in Redis now: a re-entry reports the token the
	// hold had; a hold taken again after a loss, a new one (Unlock names it).
	m.token = token
	// See ReentrantMutex.lock. The owner's readers may enter too (a
	// writer's owner may read), and sleep on the readers' channel.
	m.c.ps.wakeKin(m.wwake, m.owner)
	m.c.ps.wakeKin(m.rwake, m.owner)
	return true, nil
}

// acquireW runs the attempts of one Lock or TryLock call and returns the
// write hold's token, when the attempt that took it was sent, and the call's
// request id (an Unlock names it, see release).
func (m *RWMutex) acquireW(ctx context.Context, block bool) (token int64, sent time.Time, req string, ok bool, err error) {
	c := m.c
	req = newID()
	keys := []string{m.key, m.fence}
	wait := int64(0) // the lease of the waiting place; 0: do not queue
	if block {
		wait = c.opts.watchdogTimeout.Milliseconds()
	}
	var (
		upgrade bool
		queued  *hold // the waiting place, tracked while waiting
		// unsettled: an attempt's outcome is unknown, so it may have
		// queued the writer (a Lock's): the queue is left below.
		unsettled bool
		lastErr   error // the last attempt's (see Client.cleanupAfter)
	)
	undo := func(ctx context.Context) {
		_, _ = m.unlockW(ctx, req, "", "")
	}
	var try attemptFunc
	try = func(ctx context.Context) (bool, time.Duration, error) {
		c.wd.setReleasing(queued, true) // this attempt may remove it
		sent = time.Now()
		args := []any{m.owner, m.lease.Milliseconds(), req, fenceRetention(m.lease), wait}
		reenter := m.mayReenter(&m.wn, &m.wpending)
		m.mu.Lock()
		// A read hold of the owner in Redis is this handle's (an upgrade,
		// refused) only when it holds or takes the read lock (an attempt
		// of its RLock is on the way or took it: an RLock that waits holds
		// nothing), or another handle may hold it (WithOwner). Otherwise it
		// awaits a release in flight (an RUnlock that failed with no reply
		// counts as done), or Redis brought it back: wait for it, as for
		// another owner's.
		reads := m.rn > 0 || m.rtaking > 0 || m.shared
		m.mu.Unlock()
		switch {
		case !reads && reenter:
			args = append(args, "1", "0")
		case !reads:
			args = append(args, "0", "0")
		case !reenter:
			args = append(args, "0")
		}
		cmd, acked, waitErr := c.runSynced(ctx, rwLockScript, keys, args...)
		res, err := cmd.Int64Slice()
		lastErr = err
		if err != nil {
			unsettled = unsettled || outcomeUnknown(err)
			return false, 0, err
		}
		switch res[0] {
		case 1:
			if err := c.replicated(ctx, acked, waitErr, undo); err != nil {
				return false, 0, err
			}
			token = res[1]
			return true, 0, nil
		case 2:
			// A reply of 2 left the waiting place as it was: the
			// watchdog renews it again, also while this attempt waits
			// for the replies of the handle's RLock attempts below
			// (however slow they are).
			c.wd.setReleasing(queued, false)
			if !m.shared {
				// A read hold of the handle (or an attempt of its RLock
				// that took one) makes it an upgrade at once. Else an
				// attempt of its RLock on its way may have failed in Redis
				// already: wait for its reply to tell.
				m.mu.Lock()
				reads = m.readsLocked()
				m.mu.Unlock()
				if !reads {
					if err := m.awaitReadReplies(ctx); err != nil {
						return false, 0, err
					}
					m.mu.Lock()
					reads = m.readsLocked()
					m.mu.Unlock()
				}
				if !reads {
					// What made it a possible upgrade was an attempt of
					// the handle's RLock, which failed since (it waits):
					// the owner's read hold was not the handle's, or is
					// gone. Try again, as no upgrade.
					if !block {
						return try(ctx)
					}
					return false, time.Millisecond, nil
				}
			}
			upgrade = true
			return true, 0, nil // ends the wait; reported below
		}
		if block {
			if queued == nil || queued.isLost() {
				// (Re)track the place this attempt took or refreshed. A
				// place found gone (the data was lost: FLUSHALL, a restart,
				// a failover) wakes the writer to queue again: the read
				// release that frees the lock wakes writers only while one
				// has a place, and the writer's sleep is bounded by a lease
				// that may have vanished with it. (The watchdog runs this
				// under its mutex; pubsub's is taken inside it.)
				c.wd.remove(queued)
				queued = c.wd.addNotify(m.name, m.key, 'f', m.qfield, c.opts.watchdogTimeout, true, sent,
					func() { c.ps.wakeKin(m.wwake, m.owner) })
			} else {
				c.wd.setReleasing(queued, false)
			}
		}
		if !reads {
			m.mu.Lock()
			reads = m.rn > 0 || m.rtaking > 0
			m.mu.Unlock()
			if reads {
				// A read hold of this handle (another goroutine's RLock)
				// may have come in before this attempt: the owner's read
				// hold it waited for may be the handle's own, an upgrade.
				// Try again at once, as one (a TryLock: now; a Lock: at
				// its next attempt, which also leaves the queue).
				if !block {
					return try(ctx)
				}
				return false, time.Millisecond, nil
			}
		}
		return false, c.retryBound(res[1]), nil
	}
	// No queueing without an attempt: the first attempt is what reports an
	// upgrade (ErrUpgrade) or lets the owner re-enter, which no local
	// waiter's wake-up would ever do.
	ok, err = c.acquire(ctx, m.wwake, &kinship{owner: m.owner}, block, false, try, undo, nil)
	if queued != nil {
		// Without waiting for a renewal of the place in flight (it may be
		// stuck on an unresponsive Redis for a renewal period): it renews
		// only a place that still exists, and its reply is ignored.
		c.wd.setReleasing(queued, true)
		c.wd.remove(queued)
	}
	if (queued != nil || block && unsettled) && (!ok || upgrade) {
		// Gave up: leave the queue, letting the readers behind in; in the
		// background after an attempt a migrating slot refused, as an undo
		// (see Client.cleanupAfter). The unqueue names this call: late, it
		// leaves alone the place of the handle's next Lock.
		c.cleanupAfter(ctx, lastErr, func(ctx context.Context) { m.unqueue(ctx, req) })
	}
	if upgrade {
		return 0, sent, req, false, ErrUpgrade
	}
	return token, sent, req, ok, err
}

// unlockW releases one write hold (or, with undo set, the hold taken by that
// acquisition only) and returns the owner's remaining write hold count, or
// -1 when it held none. token is the fencing token of the hold released, as
// tokenArg writes it ("": unknown, any write hold of the owner). done, for a
// release only, is the request id of an acquisition of that hold whose reply
// came ("": none), which a partial release drops from the hold's list of its
// last acquisitions (see excl.unlockDone).
func (m *RWMutex) unlockW(ctx context.Context, undo, token, done string) (int64, error) {
	if (token == "" || token == "0") && undo == "" {
		if t := currentToken(ctx, m.c, m.key, "w", m.owner); t > 0 {
			token = tokenArg(t) // see currentToken
		}
	}
	args := []any{m.owner, newID(), m.c.publishCommand(ctx), fenceRetention(m.lease), undo, token}
	if done != "" && undo == "" {
		args = append(args, done) // optional: see rw_unlock.lua
	}
	keys := []string{m.key, m.fence, m.rwake, m.wwake}
	n, err := rwUnlockScript.Run(ctx, m.c.rdb, keys, args...).Int64()
	// An undo is resent too (it names its acquisition, see unlockReq).
	m.c.resendRelease(ctx, err, undo != "" || token != "" && token != "0", func(ctx context.Context) error { return rwUnlockScript.Run(ctx, m.c.rdb, keys, args...).Err() })
	return n, convertErr(err)
}

// unlockR is unlockW for a read hold. Read holds have no token: begun, the
// request that began the read hold released ("": unknown), tells it from a
// later read hold of the owner, and a read release resent after a lost reply
// is recognised by its request id (see rw_runlock.lua).
func (m *RWMutex) unlockR(ctx context.Context, undo, begun, done string) (int64, error) {
	if begun == "" && undo == "" {
		if v := readMaster(ctx, m.c, m.key, "rg:"+m.owner); len(v) == 1 { // see currentToken
			begun, _ = v[0].(string)
			if begun == "" {
				begun = "-" // the owner reads nothing: name no read hold
			}
		}
	}
	args := []any{m.owner, newID(), m.c.publishCommand(ctx), fenceRetention(m.lease), undo, begun}
	if done != "" && undo == "" {
		args = append(args, done) // optional: see rw_runlock.lua
	}
	keys := []string{m.key, m.fence, m.wwake}
	n, err := rwRUnlockScript.Run(ctx, m.c.rdb, keys, args...).Int64()
	if err == nil && n == 0 {
		// The owner's read hold ended (or had ended): an RLock of the
		// handle may wait for it (it may not re-enter it, see mayReenter:
		// an undo in the background, see refusedErr), and the release
		// publishes to writers only. As the resend below does.
		m.c.ps.wakeKin(m.rwake, m.owner)
	}
	// An undo is resent too (it names its acquisition, see unlockReq).
	m.c.resendRelease(ctx, err, undo != "" || begun != "", func(ctx context.Context) error {
		err := rwRUnlockScript.Run(ctx, m.c.rdb, keys, args...).Err()
		// An RLock of the handle may wait for this very read hold to
		// end (it may not re-enter it, see mayReenter), and the
		// release publishes to writers only.
		m.c.ps.wakeKin(m.rwake, m.owner)
		return err
	})
	return n, convertErr(err)
}

// unqueue removes the owner's waiting place when the Lock call with the
// request id req was the last to queue it (see rw_unqueue.lua), waking the
// readers queued behind it when it was the last.
func (m *RWMutex) unqueue(ctx context.Context, req string) {
	keys := []string{m.key, m.rwake, m.fence}
	args := []any{m.owner, m.c.publishCommand(ctx), fenceRetention(m.lease), req}
	err := rwUnqueueScript.Run(ctx, m.c.rdb, keys, args...).Err()
	// Sent again when it failed with no reply or Redis refused it (BUSY,
	// LOADING), as a FairMutex's withdrawal: left undone, the place of a
	// writer that no longer waits kept every new reader out for its lease
	// (the watchdog timeout). It names this call: a resend that lands late
	// leaves the place of the owner's next Lock alone.
	m.c.resendRelease(ctx, err, true, func(ctx context.Context) error {
		return rwUnqueueScript.Run(ctx, m.c.rdb, keys, args...).Err()
	})
	if err = convertErr(err); err != nil {
		m.c.opts.logger.Warn("redlatch: leaving the writers' queue failed", "name", m.name, "error", err)
	}
}

// Unlock releases one write hold of the owner. The last one releases the
// write lock, wakes every waiting reader and one waiting writer; the owner
// keeps its read holds, if it took any (a downgrade). It returns ErrNotHeld
// when the owner does not hold the write lock, when the lease ran out, or
// when the hold was lost (Lost is closed). Like ReentrantMutex.Unlock, it is
// idempotent per call. After an Unlock found the hold gone while other
// holds taken through the handle remained, the Unlocks that pair with those
// return ErrNotHeld and release nothing, even when the handle holds the
// lock anew meanwhile (see ReentrantMutex.Unlock).
func (m *RWMutex) Unlock(ctx context.Context) error {
	if err := m.check(ctx); err != nil {
		return err
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	return m.release(ctx, &m.wh, &m.wn, &m.wreqs, &m.worphans, func(forget bool) string {
		t := tokenArg(m.token)
		if forget {
			m.token = 0
		}
		return t
	}, m.unlockW)
}

// RUnlock releases one read hold of the owner. A release that leaves the
// lock free wakes a waiting writer. It returns ErrNotHeld when the owner
// does not hold the read lock, when its lease ran out, or when the hold was
// lost (RLost is closed). Like Unlock, the RUnlocks that pair with read
// holds lost before (see ReentrantMutex.Unlock) release nothing.
func (m *RWMutex) RUnlock(ctx context.Context) error {
	if err := m.check(ctx); err != nil {
		return err
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	return m.release(ctx, &m.rh, &m.rn, &m.rreqs, &m.rorphans, func(forget bool) string {
		b := m.rbegun
		if forget {
			m.rbegun = ""
		}
		return b
	}, m.unlockR)
}

// release is Unlock and RUnlock: like ReentrantMutex.Unlock, on the hold
// *hp counted by *np, whose acquisitions with a reply not yet named by a
// release are *rp, and *op counts holds lost with an earlier hold whose
// release has not come. guard, called with m.mu held, returns what names
// the tracked hold to the script (the writer's token, the request that
// began the read hold; see rwHold), and forgets it when told to (the hold
// ended).
func (m *RWMutex) release(ctx context.Context, hp **hold, np *int, rp *[]string, op *int, guard func(forget bool) string,
	script func(ctx context.Context, undo, guard, done string) (int64, error)) error {
	m.mu.Lock()
	if *op > 0 { // see ReentrantMutex.Unlock
		*op--
		m.mu.Unlock()
		return ErrNotHeld
	}
	h, held, done := *hp, "", ""
	if h != nil {
		held = guard(false)
		// Any acquisition of the tracked hold whose reply came will do:
		// see ReentrantMutex.Unlock.
		if r := *rp; len(r) > 0 {
			done, *rp = r[len(r)-1], r[:len(r)-1]
		}
	}
	// Counted under m.mu: see ReentrantMutex.Unlock.
	m.c.wd.setReleasingOf(h, true, *np)
	m.mu.Unlock()
	n, err := script(ctx, "", held, done)

	m.mu.Lock()
	defer m.mu.Unlock()
	if *hp != h || h == nil {
		if err == nil && h.isLost() {
			return ErrNotHeld // see ReentrantMutex.Unlock
		}
		h = nil // nothing tracked here, or a concurrent acquisition replaced it
	} else if *np > 0 {
		*np--
	}
	if h != nil && *np > 0 && (n > 0 || err != nil) {
		m.c.wd.setReleasingOf(h, false, *np)
		if err == nil && h.isLost() {
			return ErrNotHeld // see ReentrantMutex.Unlock
		}
	} else if h != nil {
		var lost bool
		if err == nil && n < 0 && *np > 0 {
			// Gone while holds taken through this handle remain: see
			// ReentrantMutex.Unlock.
			lost = m.c.wd.goneWhileHeld(h, *np)
			*op += m.c.wd.unreleased(h, *np)
		} else {
			lost = m.c.wd.remove(h)
		}
		*hp, *np, *rp = nil, 0, (*rp)[:0]
		guard(true)
		if lost {
			return ErrNotHeld
		}
	}
	if err != nil {
		return err
	}
	if n < 0 {
		// The hold was gone already (the data was lost, or the lease ran
		// out unannounced): the lock may be free, and no release said so.
		// Wake this Client's waiters, as Mutex.Unlock does.
		if hp == &m.wh {
			m.c.ps.dispatch(m.rwake, wakeAll)
		}
		m.c.ps.dispatch(m.wwake, wakeAll)
		return ErrNotHeld
	}
	return nil
}

// RLock blocks until the owner holds the read lock once more, or ctx is
// done. It waits while another owner holds the write lock, or waits for it
// (unless this owner already reads, or holds the write lock). A failed wait
// returns an error matching both ErrNotObtained and ctx.Err().
func (m *RWMutex) RLock(ctx context.Context) error {
	_, err := m.rlock(ctx, true)
	return err
}

// TryRLock makes one attempt at the read lock; (false, nil) means a writer
// holds the lock or waits for it.
func (m *RWMutex) TryRLock(ctx context.Context) (bool, error) {
	return m.rlock(ctx, false)
}

func (m *RWMutex) rlock(ctx context.Context, block bool) (bool, error) {
	if err := m.check(ctx); err != nil {
		return false, err
	}
	// Close waits for this call to give back what it took after Close
	// began (closedAfter, retake; see Client.waits).
	if !m.c.enterWait() {
		return false, ErrClosed
	}
	defer m.c.leaveWait() // after the cleanup below
	// This call's share of m.rtaking.
	taking := 0
	m.mu.Lock()
	m.rpending++
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.rpending--
		m.rtaking -= taking
		m.mu.Unlock()
	}()
	begun, sent, req, ok, err := m.acquireR(ctx, block, &taking)
	if !ok {
		return false, err
	}
	m.mu.Lock()
	if m.rh != nil && !m.rh.isLost() && begun != m.rbegun && begun != "" && m.rbegun != "" {
		// Another read hold than the live one tracked here: a late reply,
		// or a new read hold (see ReentrantMutex.lock and retake).
		m.mu.Unlock()
		first := req
		begun, sent, ok, err = retake(ctx, begun,
			func(ctx context.Context) (b string, s time.Time, ok bool, err error) {
				b, s, req, ok, err = m.acquireR(ctx, block, &taking)
				return b, s, ok, err
			},
			func(ctx context.Context, b string) { _, _ = m.unlockR(ctx, "", b, first) })
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
	if m.rh == nil || m.rh.isLost() || begun != m.rbegun { // see ReentrantMutex.lock
		carried := m.c.wd.replace(m.rh, m.rn, begun != "" && begun == m.rbegun)
		if cleanup = m.c.closedAfter(ctx, func(ctx context.Context) {
			_, _ = m.unlockR(ctx, "", begun, req)
		}); cleanup != nil {
			m.rh, m.rn, m.rbegun, m.rreqs = nil, 0, "", m.rreqs[:0]
			return false, ErrClosed
		}
		kind, member := rwHold(m.rfield, begun)
		if carried == 0 {
			m.rreqs = m.rreqs[:0]
		}
		m.rh, m.rn = m.c.wd.add(m.name, m.key, kind, member, m.lease, m.renew, sent), carried
	} else {
		m.c.wd.extend(m.rh, sent, m.rn+1) // see ReentrantMutex.lock
	}
	m.rbegun = begun
	m.rn++
	m.rreqs = append(m.rreqs, req)
	// The owner's other readers may enter too, even past waiting writers.
	m.c.ps.wakeKin(m.rwake, m.owner)
	return true, nil
}

// acquireR runs the attempts of one RLock or TryRLock call and returns the
// request id that began the read hold ("" when Redis did not say), when
// the attempt that took it was sent, and the call's request id (an RUnlock
// names it, see release). *taking counts the call's attempts in m.rtaking.
func (m *RWMutex) acquireR(ctx context.Context, block bool, taking *int) (begun string, sent time.Time, req string, ok bool, err error) {
	c := m.c
	req = newID()
	keys := []string{m.key, m.fence}
	undo := func(ctx context.Context) { _, _ = m.unlockR(ctx, req, "", "") }
	try := func(ctx context.Context) (bool, time.Duration, error) {
		sent = time.Now()
		args := []any{m.owner, m.lease.Milliseconds(), req}
		if !m.mayReenter(&m.rn, &m.rpending) {
			args = append(args, "0")
		}
		took := false
		m.mu.Lock()
		m.rtaking++
		m.rflight.add()
		*taking++
		m.mu.Unlock()
		defer func() {
			m.mu.Lock()
			m.rflight.done()
			if !took { // failed: it holds nothing (an unknown outcome is undone)
				m.rtaking--
				*taking--
			}
			m.mu.Unlock()
		}()
		cmd, acked, waitErr := c.runSynced(ctx, rwRLockScript, keys, args...)
		res, err := cmd.Slice()
		if err != nil {
			return false, 0, err
		}
		if len(res) < 2 {
			return false, 0, fmt.Errorf("%w: read lock reply %v", ErrWrongType, res)
		}
		status, _ := res[0].(int64)
		n, ok := res[1].(int64)
		if !ok {
			return false, 0, fmt.Errorf("%w: read lock reply %v", ErrWrongType, res)
		}
		if status == 1 {
			if len(res) > 2 {
				begun, _ = res[2].(string)
			}
			if err := c.replicated(ctx, acked, waitErr, undo); err != nil {
				return false, 0, err
			}
			took = true
			return true, 0, nil
		}
		return false, c.retryBound(n), nil
	}
	ok, err = c.acquire(ctx, m.rwake, &kinship{owner: m.owner}, block, false, try, undo, nil)
	return begun, sent, req, ok, err
}

// readsLocked reports whether the handle holds a read lock, or an RLock
// attempt of it took one whose RLock has not counted it yet: a write
// attempt answered 2 is then an upgrade. m.mu is held.
func (m *RWMutex) readsLocked() bool {
	return m.rn > 0 || m.rtaking > m.rflight.n
}

// awaitReadReplies waits until no attempt of the handle's RLock is on its
// way (see acquireW), or ctx ends.
func (m *RWMutex) awaitReadReplies(ctx context.Context) error {
	m.mu.Lock()
	landed := m.rflight.landed()
	m.mu.Unlock()
	if landed == nil {
		return nil
	}
	select {
	case <-landed:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// rwHold describes a write or read hold to the watchdog (see
// lua/renew.lua): kind 'g', held while its guard (the writer's token, or the
// request that began the read hold) is the hold's in Redis; or kind 'f', by
// the lease field alone, when the guard is unknown ("").
func rwHold(field, guard string) (kind byte, member string) {
	if guard != "" {
		return 'g', guard + ":" + field
	}
	return 'f', field
}

// Token returns the fencing token of the current write hold, or 0 when the
// handle holds no write lock (read holds have no token). A new writer always
// gets a higher token than the previous one; re-entry keeps it. See
// Mutex.Token.
func (m *RWMutex) Token() int64 {
	if m == nil {
		return 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.wh.isLost() {
		return 0
	}
	return m.token
}

// Lost returns a channel closed when the current write hold ends before its
// last Unlock. See Mutex.Lost.
func (m *RWMutex) Lost() <-chan struct{} {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.wh.lostChan()
}

// RLost returns a channel closed when the current read hold ends before its
// last RUnlock (its lease ran out, or ForceUnlock); nil when the handle
// holds no read lock.
func (m *RWMutex) RLost() <-chan struct{} {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.rh.lostChan()
}

// RLocker returns the read side as a Locker (RLock, RUnlock, RLost), for Do.
func (m *RWMutex) RLocker() Locker { return rlocker{m} }

type rlocker struct{ m *RWMutex }

func (r rlocker) Lock(ctx context.Context) error   { return r.m.RLock(ctx) }
func (r rlocker) Unlock(ctx context.Context) error { return r.m.RUnlock(ctx) }
func (r rlocker) Lost() <-chan struct{}            { return r.m.RLost() }
func (r rlocker) afterLost(lost <-chan struct{}, f func()) (func(), bool) {
	r.m.mu.Lock()
	h := r.m.rh
	r.m.mu.Unlock()
	return holdAfterLost(r.m.c.wd, h, lost, f)
}

func (m *RWMutex) afterLost(lost <-chan struct{}, f func()) (func(), bool) {
	m.mu.Lock()
	h := m.wh
	m.mu.Unlock()
	return holdAfterLost(m.c.wd, h, lost, f)
}

// info returns whether anyone holds the lock and the latest lease left.
func (m *RWMutex) info(ctx context.Context) (bool, time.Duration, error) {
	if err := m.check(ctx); err != nil {
		return false, 0, err
	}
	res, err := rwInfoScript.Run(ctx, m.c.rdb, []string{m.key}).Int64Slice()
	if err != nil {
		return false, 0, convertErr(err)
	}
	return res[0] == 1, msDuration(res[1]), nil
}

// TTL returns the longest remaining lease among the holds of the lock (the
// writer's and the readers'); 0 when it is free.
func (m *RWMutex) TTL(ctx context.Context) (time.Duration, error) {
	_, d, err := m.info(ctx)
	return d, err
}

// IsLocked reports whether anyone holds the lock, reading or writing.
// Writers waiting for it do not count.
func (m *RWMutex) IsLocked(ctx context.Context) (bool, error) {
	held, _, err := m.info(ctx)
	return held, err
}

// ForceUnlock releases every hold of the lock, the writer's and all the
// readers', and wakes the waiters. It reports whether anything was held.
// Former holders see Lost (or RLost) close at their next renewal (WithLease
// holds when their lease runs out on the holder's clock). A call resent
// after a lost reply (by the Redis client, or by ForceUnlock itself, as
// Mutex.ForceUnlock states) is applied once: it leaves alone the holds
// taken after its first run (within the limit Mutex.ForceUnlock states).
// Meant for operators and tests.
func (m *RWMutex) ForceUnlock(ctx context.Context) (bool, error) {
	if err := m.check(ctx); err != nil {
		return false, err
	}
	n, err := m.c.runOnce(ctx, false, rwForceUnlockScript, []string{m.key, m.rwake, m.wwake, m.fence},
		m.c.publishCommand(ctx), newID(), fenceRetention(m.lease)).Int64()
	return n == 1, convertErr(err)
}

package redlatch

import (
	"context"
	_ "embed"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

var (
	//go:embed lua/fair_common.lua
	fairCommonLua string
	//go:embed lua/fair_lock.lua
	fairLockLua string
	//go:embed lua/fair_unlock.lua
	fairUnlockLua string
	//go:embed lua/fair_force_unlock.lua
	fairForceUnlockLua string

	fairLockScript        = newScript(fenceLua + fenceAcquireLua + idsLua + fairCommonLua + fairLockLua)
	fairUnlockScript      = newScript(fenceLua + fenceReleaseLua + idsLua + fairCommonLua + fairUnlockLua)
	fairForceUnlockScript = newScript(fenceLua + fenceReleaseLua + fenceForceLua + fairCommonLua + fairForceUnlockLua)
)

// FairMutex is a distributed reentrant lock granted strictly in the order
// in which its waiters arrived at Redis.
//
// A Lock that finds the lock taken queues at the tail of a queue kept in
// Redis; the arrival order is a sequence number given by the server, so
// client clocks play no part and two arrivals in the same millisecond still
// queue in order. Unlock hands the lock directly to the queue head, inside
// the same script, and wakes that waiter only (the waiters of a Client share
// one channel per lock, and the message names the waiter): no other waiter
// wakes, and no newcomer can barge in between. The message carries the new
// hold's fencing token, so the woken waiter holds the lock without another
// round trip (the watchdog gives the hold its full lease at its next
// renewal); a WithLease waiter, whose lease the watchdog does not renew,
// claims the lock in one round trip that starts its full lease. A TryLock
// never jumps the queue either: it fails while anyone waits.
//
// Holds are counted like those of ReentrantMutex: ownership belongs to the
// handle or its WithOwner id, each Lock needs one Unlock, the token stays the
// same while the owner holds the lock, and a Lock by an owner that already
// holds the lock re-enters it at once. Lock calls of the owner queued on the
// same Client re-enter as soon as the owner gets the lock; on another
// Client, at their next check.
//
// Waiter liveness. While a waiter waits, its Client's watchdog renews its
// place in the queue as it renews held leases. A waiter whose process died
// (or that lost Redis) keeps its place until its Client's watchdog timeout
// has passed since the place's last renewal, then the place is dropped; the
// waiters behind sleep no longer than that place's expiry, so a dead waiter
// delays them by at most its Client's watchdog timeout. The lock handed to a
// waiter that died meanwhile is released when its place would have expired:
// a handoff lasts what remained of the place until the waiter's watchdog
// renews it (or a WithLease waiter claims it). A waiter whose context ends,
// or whose Client is closed,
// leaves the queue at once (with a fresh context bounded to a few seconds),
// and releases the lock if it was handed to it meanwhile.
//
// Wake-ups. The head of the queue is woken by a message naming it. If the
// message is lost, it finds the lock anyway at its next check: every
// waiter checks at least every third of its Client's watchdog timeout, when
// the holder's lease runs out, and when the earliest queue place expires.
//
// Keys, all under the hash tag of the name (one cluster slot): "{name}:fair"
// (the hold), "{name}:fairq" and "{name}:fairx" (the queue: arrival numbers
// and place expiries), and the fencing counter "{name}:fence"; each Client's
// waiters listen on the channel "{name}:fairw:<Client id>". When the lock is
// free and no one waits, only the fencing counter remains (it expires on its
// own). A FairMutex is a different lock from a Mutex of the same name.
type FairMutex struct {
	c       *Client
	name    string
	key     string // the hold hash
	queue   string // arrival numbers
	places  string // place expiries
	fence   string
	wchan   string // prefix of the per-waiter channels
	owner   string
	shared  bool // WithOwner: other handles may hold the lock as this owner
	lease   time.Duration
	renew   bool
	err     error
	keys    []string
	placeMs int64 // lease of a queue place: the watchdog timeout

	mu    sync.Mutex
	h     *hold // the hold this handle tracks
	n     int   // holds taken through this handle and not yet released
	token int64
	// reqs: the waiter ids of this handle's acquisitions of the hold it
	// tracks whose replies came and that no Unlock has named yet (see
	// ReentrantMutex.reqs).
	reqs    []string
	pending int // Lock and TryLock calls under way (see ReentrantMutex.pending)
	orphans int // see ReentrantMutex.orphans
}

// FairMutex returns a handle on the fair lock called name. It does not talk
// to Redis. Bad arguments are reported by the handle's methods as errors
// wrapping ErrInvalidArgument.
func (c *Client) FairMutex(name string, opts ...LockOption) *FairMutex {
	o := newLockOptions(name, opts)
	f := &FairMutex{c: c, name: name, owner: o.owner, shared: o.shared, err: o.err}
	if c != nil && f.err == nil && strings.HasPrefix(name, "}") {
		// An empty hash tag would scatter the keys over several slots.
		f.err = invalidArg("name", "must not start with '}'")
	}
	if c != nil {
		tag := c.tag(name)
		f.key, f.queue, f.places = tag+":fair", tag+":fairq", tag+":fairx"
		f.fence, f.wchan = tag+":fence", tag+":fairw:"
		f.keys = []string{f.key, f.queue, f.places, f.fence, f.wchan}
		f.lease, f.renew = c.leaseFor(o)
		f.placeMs = c.opts.watchdogTimeout.Milliseconds()
	}
	return f
}

// mayReenter reports whether an attempt may re-enter a hold of the owner
// that Redis has (see mayReenter).
func (f *FairMutex) mayReenter() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return mayReenter(f.n, f.pending, f.shared)
}

func (f *FairMutex) check(ctx context.Context) error {
	if f == nil {
		return invalidArg("lock", "is nil")
	}
	if err := f.c.check(); err != nil {
		return err
	}
	return firstErr(f.err, ctxArg(ctx))
}

// Lock blocks until the owner holds the lock once more, or ctx is done: at
// once when the lock is free and no one waits, or when the owner already
// holds it; else after every waiter that arrived before it. A failed wait
// returns an error matching both ErrNotObtained and ctx.Err().
func (f *FairMutex) Lock(ctx context.Context) error {
	_, err := f.lock(ctx, true)
	return err
}

// TryLock makes one attempt and reports whether the owner now holds the
// lock once more. It returns (false, nil) when another owner holds the lock
// or when waiters are queued for it: it does not jump the queue.
func (f *FairMutex) TryLock(ctx context.Context) (bool, error) {
	return f.lock(ctx, false)
}

func (f *FairMutex) lock(ctx context.Context, block bool) (bool, error) {
	if err := f.check(ctx); err != nil {
		return false, err
	}
	// Close waits for this call to withdraw what it queued or was handed.
	if !f.c.enterWait() {
		return false, ErrClosed
	}
	defer f.c.leaveWait() // after the cleanup below
	f.mu.Lock()
	f.pending++
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.pending--
		f.mu.Unlock()
	}()
	token, sent, req, ok, err := f.acquire(ctx, block)
	if !ok {
		return false, err
	}
	f.mu.Lock()
	if late(f.h, f.token, token) { // see ReentrantMutex.lock
		f.mu.Unlock()
		first := req
		token, sent, ok, err = retake(ctx, token,
			func(ctx context.Context) (t int64, s time.Time, ok bool, err error) {
				t, s, req, ok, err = f.acquire(ctx, block)
				return t, s, ok, err
			},
			func(ctx context.Context, t int64) { _, _ = f.unlock(ctx, first, t) })
		if !ok {
			return false, err
		}
		f.mu.Lock()
	}
	var cleanup func()
	defer func() {
		if cleanup != nil {
			cleanup() // after f.mu is released
		}
	}()
	defer f.mu.Unlock()
	if f.h == nil || f.h.isLost() || token != f.token { // see ReentrantMutex.lock
		carried := f.c.wd.replace(f.h, f.n, token == f.token)
		if cleanup = f.c.closedAfter(ctx, func(ctx context.Context) {
			_, _ = f.unlock(ctx, req, token)
		}); cleanup != nil {
			f.h, f.n, f.token, f.reqs = nil, 0, 0, f.reqs[:0]
			return false, ErrClosed
		}
		kind, member := exclHold(f.owner, token)
		if carried == 0 {
			f.reqs = f.reqs[:0]
		}
		f.h, f.n = f.c.wd.add(f.name, f.key, kind, member, f.lease, f.renew, sent), carried
	} else {
		f.c.wd.extend(f.h, sent, f.n+1) // a re-entry restarts the lease (see ReentrantMutex.lock)
	}
	f.n++
	f.reqs = append(f.reqs, req)
	// The token of the hold in Redis now: a re-entry reports the token the
	// hold had; a hold taken again after a loss, a new one (Unlock names it).
	f.token = token
	return true, nil
}

// acquire runs the attempts of one Lock or TryLock call. The waiter queues
// at its first failed attempt, subscribes to its own channel, checks again
// (a handoff between its first attempt and the subscription is not missed),
// then sleeps until a wake-up or the bound the script returned.
//
// req is the call's waiter id, which names its acquisition in the hold (see
// FairMutex.Unlock).
func (f *FairMutex) acquire(ctx context.Context, block bool) (token int64, sent time.Time, req string, ok bool, err error) {
	id := newID()
	member := id + "|" + strconv.FormatInt(f.lease.Milliseconds(), 10) + "|" +
		strconv.FormatInt(f.placeMs, 10) + "|" + f.c.ps.id + "|" + f.owner
	mode := "t"
	if block {
		mode = "w"
	}
	pub, closed := f.c.waitPublishCommand(ctx)
	if closed {
		return 0, time.Time{}, "", false, ErrClosed
	}
	retention := fenceRetention(f.lease)
	var place *hold // the queue place, renewed by the watchdog
	// requeued: the waiter got a new place after its first one ended (it
	// expired, or was granted and the grant expired). A grant message for the
	// old place may still come: grants are then claimed with an attempt.
	requeued := false
	tried := false // an attempt was sent, or may have been
	// unsettled: the last attempt's outcome is unknown (see
	// outcomeUnknown: a copy may still reach Redis). Only then does the
	// withdrawal leave a tombstone: a name keeps the last 32, and the
	// withdrawals of waiters whose wait ended while they slept would push
	// out the one that matters.
	unsettled := false
	var lastErr error // the last attempt's (see Client.cleanupAfter)
	try := func(ctx context.Context) (bool, time.Duration, error) {
		tried, unsettled = true, true
		s := time.Now()
		reenter := "0" // see mayReenter
		if f.mayReenter() {
			reenter = "1"
		}
		cmd, acked, waitErr := f.c.runSynced(ctx, fairLockScript, f.keys, pub, retention, id, member, f.owner,
			f.lease.Milliseconds(), f.placeMs, reenter, mode)
		res, err := cmd.Int64Slice()
		unsettled, lastErr = err != nil && outcomeUnknown(err), err
		if err != nil {
			return false, 0, err
		}
		if len(res) < 3 {
			return false, 0, fmt.Errorf("%w: fair lock reply %v", ErrWrongType, res)
		}
		if res[0] == 1 {
			// Under WithReplicaSync a hold too few replicas have is
			// released by the cleanup below, which the error triggers.
			if err := f.c.replicated(ctx, acked, waitErr, nil); err != nil {
				return false, 0, err
			}
			token, sent = res[1], s
			return true, 0, nil
		}
		if block && (res[2] == 1 || place == nil || place.isLost()) {
			// A new place at the tail (the first, or one after the old
			// place expired), or one a retried attempt found already made
			// (its first reply was lost): the watchdog keeps it alive from
			// now on.
			requeued = requeued || place != nil
			f.c.wd.remove(place)
			place = f.c.wd.add(f.name, f.places, 'z', member, f.c.opts.watchdogTimeout, true, s)
		}
		return false, f.c.retryBound(res[1]), nil
	}
	// A handoff whose message carries its token is taken without a round
	// trip, by a watchdog-renewed waiter whose place is tracked: the grant
	// lasts in Redis at least until the place would have expired, which is
	// no earlier than the place's local deadline; the watchdog renews the
	// new hold before then. (A WithLease waiter claims the grant with an
	// attempt, which gives it its full fixed lease; so does a Client with
	// WithReplicaSync, whose attempt is followed by WAIT: the grant was
	// written by the releaser's script, which no WAIT follows.)
	take := func(grant string) bool {
		t, perr := strconv.ParseInt(grant, 10, 64)
		if perr != nil || !f.renew || f.c.opts.replicas > 0 || place == nil || place.isLost() || requeued {
			return false
		}
		deadline := f.c.wd.deadlineOf(place)
		if !time.Now().Before(deadline) {
			return false // after a pause: claim it with an attempt, or learn it is gone
		}
		token, sent = t, deadline.Add(-f.lease)
		return true
	}
	ok, err = f.wait(ctx, id, block, try, take)
	if ok {
		// The owner holds the lock: its other queued Lock calls on this
		// Client (this handle's, and those of handles sharing its owner id)
		// re-enter it at their next attempt, so wake them now (see
		// kinship; handles on other Clients find out at their next check).
		f.c.ps.wakeKin(f.wchan+f.c.ps.id, f.owner)
	}
	if place != nil {
		f.c.wd.setReleasing(place, true)
		f.c.wd.remove(place)
	}
	if !ok && err != nil && tried {
		// The wait ended (ctx, Close) or an attempt's outcome is unknown:
		// leave the queue at once, and release a handoff granted meanwhile.
		tomb := unsettled
		f.c.cleanupAfter(ctx, lastErr, func(ctx context.Context) { _, _ = f.withdraw(ctx, id, member, tomb) })
	}
	return token, sent, id, ok, err
}

// wait runs try until it succeeds, sleeping between attempts until the
// handoff's wake-up or the bound try returned; with block false it makes a
// single attempt. The waiters of one Client share one channel per lock,
// subscribed while any of them waits, and each wake-up names its waiter.
// A waiter joins the channel before its first attempt when the channel is
// already subscribed (no round trip; a handoff right after the attempt is
// not missed); otherwise it subscribes after its first failed attempt and
// checks once more before it sleeps.
func (f *FairMutex) wait(ctx context.Context, id string, block bool, try attemptFunc, take func(grant string) bool) (bool, error) {
	channel := f.wchan + f.c.ps.id
	var w *waiter
	defer func() {
		if w != nil {
			w.leave(false) // wake-ups name their waiter: none to pass on
		}
	}()
	if block {
		w = f.c.ps.joinQueuedID(channel, id)
		f.c.ps.setKin(w, f.owner)
	}
	for {
		if ctx.Err() != nil {
			return false, newWaitError(ctx, nil) // see Client.acquire
		}
		ok, retry, err := f.c.attempt(ctx, try)
		switch {
		case err != nil:
			return false, f.c.failedAttempt(ctx, err, nil)
		case ok && f.c.closed.Load():
			// Closed while the attempt was on the way: the wait was in
			// progress at Close (see Client.acquire); acquire withdraws
			// the waiter, which releases what it took.
			return false, ErrClosed
		case ok:
			return true, nil
		case !block:
			return false, nil
		case w == nil:
			if w, err = f.c.ps.joinID(ctx, channel, id, retry); err != nil {
				return false, err
			}
			f.c.ps.setKin(w, f.owner) // before the next attempt: no wake-up missed
		default:
			if _, err = w.wait(ctx, retry); err != nil {
				return false, err
			}
			if g := w.takeGrant(); g != "" && take(g) {
				if f.c.closed.Load() {
					return false, ErrClosed // see above
				}
				return true, nil
			}
		}
	}
}

// withdraw withdraws the waiter id (its queue place member), releasing what
// it was granted; with tomb set it also leaves the waiter's tombstone, for
// an attempt of it whose outcome is unknown (see fair_unlock.lua).
func (f *FairMutex) withdraw(ctx context.Context, id, member string, tomb bool) (int64, error) {
	return f.release(ctx, id, member, "", 0, tomb)
}

// unlock releases one hold of the owner. It returns the owner's remaining
// hold count, or -1 when the owner held nothing. token is the fencing token
// of the hold released, or 0 when unknown (see excl.unlock). done names an
// acquisition of the hold whose reply reached its caller ("": none): a
// partial release drops it from the hold's list of its last acquisitions
// (see excl.unlockDone).
func (f *FairMutex) unlock(ctx context.Context, done string, token int64) (int64, error) {
	return f.release(ctx, "", "", done, token, false)
}

// release is unlock and, with a waiter id, withdraw.
func (f *FairMutex) release(ctx context.Context, waiter, member, done string, token int64, tomb bool) (int64, error) {
	channel := f.wchan + f.c.ps.id
	if token == 0 && waiter == "" {
		token = currentToken(ctx, f.c, f.key, "o", f.owner)
	}
	args := []any{f.c.publishCommand(ctx), fenceRetention(f.lease), f.owner, newID(), f.c.ps.id, tokenArg(token)}
	if waiter != "" {
		args = append(args, waiter, member) // a withdrawal (see fair_unlock.lua)
		if tomb {
			args = append(args, "1")
		}
	} else if done != "" {
		args = append(args, "", "", done)
	}
	res, err := fairUnlockScript.Run(ctx, f.c.rdb, f.keys, args...).Slice()
	if err != nil {
		// The lock may have gone to a waiter of this Client without a
		// message: wake them all, and the one granted claims it.
		f.c.ps.dispatch(channel, wakeAll)
		// A withdrawal is resent too: left undone, the waiter's dead place
		// stays queued (and is handed the lock) until it expires, a watchdog
		// timeout, and what it was granted stays held by nobody meanwhile.
		// It names its waiter: a resend after a first run that did arrive
		// finds it gone and releases nothing twice.
		f.c.resendRelease(ctx, err, token != 0 || waiter != "", func(ctx context.Context) error {
			err := fairUnlockScript.Run(ctx, f.c.rdb, f.keys, args...).Err()
			if err == nil {
				f.c.ps.dispatch(channel, wakeAll) // a grant to a waiter of this Client: it claims it
			}
			return err
		})
		return 0, convertErr(err)
	}
	var n int64
	var grant string
	ok := len(res) == 2
	if ok {
		n, ok = res[0].(int64)
	}
	if ok {
		grant, ok = res[1].(string)
	}
	if !ok {
		return 0, fmt.Errorf("%w: fair unlock reply %v", ErrWrongType, res)
	}
	if grant != "" {
		// Handed to a waiter of this Client: delivered here, unpublished.
		f.c.ps.dispatch(channel, wakeWaiterPrefix+grant)
	}
	return n, nil
}

// Unlock releases one hold of the owner; the last one hands the lock to the
// waiter at the head of the queue, if any, and wakes that waiter only. It
// returns ErrNotHeld when the owner holds nothing, when the lease ran out,
// or when the hold was lost (Lost is closed).
func (f *FairMutex) Unlock(ctx context.Context) error {
	if err := f.check(ctx); err != nil {
		return err
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	f.mu.Lock()
	if f.orphans > 0 { // see ReentrantMutex.Unlock
		f.orphans--
		f.mu.Unlock()
		return ErrNotHeld
	}
	h, token := f.h, f.token // no hold tracked: token 0, any hold of the owner
	// Any acquisition of the tracked hold whose reply came will do (see
	// ReentrantMutex.Unlock).
	var done string
	if h != nil && len(f.reqs) > 0 {
		done = f.reqs[len(f.reqs)-1]
		f.reqs = f.reqs[:len(f.reqs)-1]
		if f.n == 1 && f.pending == 0 && !f.shared {
			done = "" // a final release (see ReentrantMutex.Unlock)
		}
	}
	// Counted under f.mu: see ReentrantMutex.Unlock.
	f.c.wd.setReleasingOf(h, true, f.n)
	f.mu.Unlock()
	n, err := f.unlock(ctx, done, token)

	f.mu.Lock()
	defer f.mu.Unlock()
	if f.h != h || h == nil {
		if err == nil && h.isLost() {
			return ErrNotHeld // see ReentrantMutex.Unlock
		}
		h = nil
	} else if f.n > 0 {
		f.n--
	}
	if h != nil && f.n > 0 && (n > 0 || err != nil) {
		f.c.wd.setReleasingOf(h, false, f.n)
		if err == nil && h.isLost() {
			return ErrNotHeld // see ReentrantMutex.Unlock
		}
	} else if h != nil {
		var lost bool
		if err == nil && n < 0 && f.n > 0 {
			// Gone while holds taken through this handle remain: see
			// ReentrantMutex.Unlock.
			lost = f.c.wd.goneWhileHeld(h, f.n)
			f.orphans += f.c.wd.unreleased(h, f.n)
		} else {
			lost = f.c.wd.remove(h)
		}
		f.h, f.n, f.token, f.reqs = nil, 0, 0, f.reqs[:0]
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
func (f *FairMutex) HoldCount(ctx context.Context) (int, error) {
	if err := f.check(ctx); err != nil {
		return 0, err
	}
	return f.c.holdCount(ctx, f.key, f.owner)
}

// Token returns the fencing token of the current hold, or 0 when the handle
// holds nothing. Every handoff issues a new, higher token. See Mutex.Token.
func (f *FairMutex) Token() int64 {
	if f == nil {
		return 0
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.h.isLost() {
		return 0
	}
	return f.token
}

// Lost returns a channel closed when the current hold ends before its last
// Unlock. See Mutex.Lost.
func (f *FairMutex) Lost() <-chan struct{} {
	if f == nil {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.h.lostChan()
}

func (f *FairMutex) afterLost(lost <-chan struct{}, fn func()) (func(), bool) {
	f.mu.Lock()
	h := f.h
	f.mu.Unlock()
	return holdAfterLost(f.c.wd, h, lost, fn)
}

// TTL returns the remaining lease of the lock, whoever holds it; 0 when it
// is free. See Mutex.TTL.
func (f *FairMutex) TTL(ctx context.Context) (time.Duration, error) {
	if err := f.check(ctx); err != nil {
		return 0, err
	}
	return f.c.keyTTL(ctx, f.key)
}

// IsLocked reports whether anyone holds the lock (a handoff not yet claimed
// by its waiter counts as held).
func (f *FairMutex) IsLocked(ctx context.Context) (bool, error) {
	if err := f.check(ctx); err != nil {
		return false, err
	}
	return f.c.keyExists(ctx, f.key)
}

// ForceUnlock releases the lock whoever holds it, however many times, and
// hands it to the waiter at the head of the queue. It reports whether the
// lock was held. The former holder's Lost closes at its next renewal (a
// WithLease hold's when its lease runs out on the holder's clock). A call
// resent after a lost reply (by the Redis client, or by ForceUnlock itself,
// as Mutex.ForceUnlock states) is applied once: it leaves alone a hold
// taken after its first run (within the limit Mutex.ForceUnlock states).
func (f *FairMutex) ForceUnlock(ctx context.Context) (bool, error) {
	if err := f.check(ctx); err != nil {
		return false, err
	}
	n, err := f.c.runOnce(ctx, false, fairForceUnlockScript, f.keys, f.c.publishCommand(ctx),
		fenceRetention(f.lease), newID()).Int64()
	return n == 1, convertErr(err)
}

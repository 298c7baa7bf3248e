package redlatch

import (
	"context"
	_ "embed"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// The fence preludes (see lua/fence.lua): a script includes only those it
// uses, since every function a prelude defines costs each call of the
// script about as much as a short command (a closure built per call).
var (
	//go:embed lua/fence.lua
	fenceLua string
	//go:embed lua/fence_acquire.lua
	fenceAcquireLua string
	//go:embed lua/fence_release.lua
	fenceReleaseLua string
	//go:embed lua/fence_force.lua
	fenceForceLua string
	//go:embed lua/ids.lua
	idsLua string
)

var (
	//go:embed lua/lock.lua
	lockLua string
	//go:embed lua/unlock.lua
	unlockLua string
	//go:embed lua/force_unlock.lua
	forceUnlockLua string

	lockScript        = newScript(fenceLua + fenceAcquireLua + idsLua + lockLua)
	unlockScript      = newScript(fenceLua + fenceReleaseLua + idsLua + unlockLua)
	forceUnlockScript = newScript(fenceReleaseLua + fenceForceLua + forceUnlockLua)
)

// excl is the Redis side of an exclusive lock, shared by Mutex and
// ReentrantMutex: one hash per lock holding the owner, its hold count and
// the fencing token (see lua/lock.lua). A Mutex and a ReentrantMutex of the
// same name are the same lock.
type excl struct {
	c         *Client
	name      string
	key       string // the lock hash
	fence     string // the fence key
	channel   string // wake-ups
	owner     string
	lease     time.Duration
	renew     bool
	reentrant bool
	shared    bool // WithOwner: other handles may hold the lock as this owner
	// quietUndo: an undo publishes a wake-up only when an attempt failed
	// during the hold it undoes (the hash's w field), not because this
	// Client has waiters: a Redlock's undo of what a round took on a
	// minority of masters would wake the Redlock's own waiter, which then
	// polls for as long as another owner holds a majority.
	quietUndo bool
	// mayReenter, when set, reports whether a reentrant lock's next attempt
	// may re-enter a hold of its owner that Redis has (see
	// ReentrantMutex.mayReenter); nil: it always may.
	mayReenter func() bool
	err        error
}

func newExcl(c *Client, name string, reentrant bool, opts []LockOption) excl {
	o := newLockOptions(name, opts)
	e := excl{c: c, name: name, owner: o.owner, reentrant: reentrant, shared: o.shared, err: o.err}
	if c != nil && e.err == nil && strings.HasPrefix(name, "}") {
		// "{}…" is an empty hash tag: Redis Cluster would hash each key
		// whole and scatter the lock's keys over several slots.
		e.err = invalidArg("name", "must not start with '}'")
	}
	if c != nil {
		tag := c.tag(name)
		e.key, e.fence, e.channel = tag+":lock", tag+":fence", tag+":wake"
		e.lease, e.renew = c.leaseFor(o)
	}
	return e
}

// check returns the error of bad input or a closed Client.
func (e *excl) check(ctx context.Context) error {
	if e == nil {
		return invalidArg("lock", "is nil")
	}
	if err := e.c.check(); err != nil {
		return err
	}
	return firstErr(e.err, ctxArg(ctx))
}

// lock takes the lock, waiting when block is set, and returns the new hold's
// fencing token. It does not touch any handle state. With
// queue set, a blocking call may queue behind the Client's other waiters
// without an attempt of its own (see Client.acquire): a re-entry must not,
// since no one would wake it.
func (e *excl) lock(ctx context.Context, kin *kinship, block, queue bool) (token int64, sent time.Time, ok bool, err error) {
	token, sent, _, ok, err = e.lockReq(ctx, kin, block, queue)
	return token, sent, ok, err
}

// lockReq is lock, which also returns the call's request id: a
// ReentrantMutex names it in the Unlock that ends this acquisition (see
// unlockDone), so that the hold stops remembering an acquisition whose
// reply arrived and that no undo or resend can name any more.
func (e *excl) lockReq(ctx context.Context, kin *kinship, block, queue bool) (token int64, sent time.Time, req string, ok bool, err error) {
	req = newID()
	try := func(ctx context.Context) (bool, time.Duration, error) {
		sent = time.Now()
		var pttl int64
		ok, token, pttl, err = e.attempt(ctx, req)
		if err != nil || ok {
			return ok, 0, err
		}
		return false, e.c.retryBound(pttl), nil
	}
	undo := func(ctx context.Context) { _, _ = e.unlock(ctx, req, 0, false) }
	var xfer *transfer
	if e.c.opts.replicas == 0 { // a transfer is an acquisition no WAIT follows
		xfer = &transfer{owner: e.owner, req: req, lease: e.lease, take: func(t int64, s time.Time) {
			token, sent = t, s
		}, token: func() int64 { return token }, giveBack: func(ctx context.Context, t int64) {
			_, _ = e.unlock(ctx, req, t, false)
		}, giveBackUnless: func(ctx context.Context, took int64) {
			t := currentToken(ctx, e.c, e.key, "o", e.owner)
			if t == 0 || t == noHold || t == took {
				// Nothing to give back now; but the transfer may still be on
				// its way (a slow link): an undo naming no hold leaves the
				// acquisition's tombstone only, which a late transfer
				// honours (see unlock.lua).
				t = noHold
			}
			_, _ = e.unlock(ctx, req, t, false)
		}}
	}
	ok, err = e.c.acquire(ctx, e.channel, kin, block, queue, try, undo, xfer)
	return token, sent, req, ok, err
}

// attempt runs the lock script once with request id req. It reports
// whether the owner holds the lock afterwards (with the token), or else the holder's remaining lease (pttl, ms). With
// WithReplicaSync, WAIT follows the script in the same round trip, and an
// acquisition too few replicas acknowledged is released again and reported
// as an error wrapping ErrNotReplicated. An error that is not a reply from
// Redis leaves the outcome unknown: undo with unlock(ctx, req).
func (e *excl) attempt(ctx context.Context, req string) (ok bool, token, pttl int64, err error) {
	ok, token, pttl, _, err = e.attemptOwn(ctx, req)
	return ok, token, pttl, err
}

// attemptOwn is attempt, which also reports whether a refusal was for a
// hold of the owner itself, which may not re-enter (see lock.lua).
func (e *excl) attemptOwn(ctx context.Context, req string) (ok bool, token, pttl int64, own bool, err error) {
	reentrant := "0"
	if e.reentrant && (e.mayReenter == nil || e.mayReenter()) {
		reentrant = "1"
	}
	cmd, acked, waitErr := e.c.runSynced(ctx, lockScript, []string{e.key, e.fence},
		e.owner, e.lease.Milliseconds(), req, reentrant, fenceRetention(e.lease))
	res, err := cmd.Int64Slice()
	if err != nil {
		return false, 0, 0, false, err
	}
	if res[0] != 1 {
		return false, 0, res[1], len(res) > 2 && res[2] == 1, nil
	}
	undo := func(ctx context.Context) { _, _ = e.unlock(ctx, req, 0, false) }
	if err := e.c.replicated(ctx, acked, waitErr, undo); err != nil {
		return false, 0, 0, false, err
	}
	return true, res[1], 0, false, nil
}

// unlock releases one hold of the owner (or, with undo set, the hold taken
// by that acquisition request only) and returns the owner's remaining hold
// count, or -1 when the owner held nothing.
//
// token is the fencing token of the hold the caller releases, or 0 when it
// does not know it. A hold of the owner with another token is not the
// caller's: it was taken after the caller's hold ended (its lease ran out,
// or this very call released it and the Redis client resent the call after
// a lost reply), by another handle sharing the owner id, and stays held.
//
// With local set (an Unlock, not an undo), a full release hands the lock to
// the oldest waiter of the same Client instead, when one waits (see
// pubsub.reserveLocal): in the same script, with a new fencing token and
// the waiter's lease, and without a publish; the waiter learns its token
// in-process. Every few local transfers the lock is released publicly, so
// that other Clients' waiters get their turn.
func (e *excl) unlock(ctx context.Context, undo string, token int64, local bool) (int64, error) {
	return e.unlockAs(ctx, e.owner, undo, token, local)
}

func (e *excl) unlockAs(ctx context.Context, owner, undo string, token int64, local bool) (int64, error) {
	return e.unlockDone(ctx, owner, undo, "", token, local)
}

// unlockDone is unlockAs for a release (undo "") that names done, the
// request id of an acquisition of the hold whose reply reached its caller
// ("": none): a partial release drops it from the hold's list of its last
// acquisitions (see lua/ids.lua). That list then names only acquisitions
// still counted whose outcome a caller may not know, so acquisitions that
// came and went while an undo was on the way do not push the one it undoes
// out of the list (which left the undo's count held: a count leak).
func (e *excl) unlockDone(ctx context.Context, owner, undo, done string, token int64, local bool) (int64, error) {
	return e.unlockReq(ctx, newID(), owner, undo, done, token, local)
}

// unlockReq is unlockDone with the release's request id req (a resend
// names the same).
func (e *excl) unlockReq(ctx context.Context, req, owner, undo, done string, token int64, local bool) (int64, error) {
	// The optional arguments of unlock.lua go only when used (see its
	// header): each costs the script about as much as a short command.
	if token == 0 && undo == "" {
		// A release that names no hold (a WithOwner handle tracking none):
		// name the owner's current hold, so that a resend after a lost reply
		// cannot release a later hold of the owner.
		token = currentToken(ctx, e.c, e.key, "o", owner)
	}
	token0 := token // the hold released, for a public release after a refused transfer
	w, waiting := e.c.ps.reserveLocal(e.channel, local && undo == "" && e.c.opts.replicas == 0, e.lease)
	third := e.c.publishCommand(ctx)
	if w != nil {
		third = w.xfer.owner // a transfer names the waiter there (see unlock.lua)
	}
	args := []any{owner, req, third, fenceRetention(e.lease), tokenArg(token)}
	if undo != "" && e.quietUndo {
		waiting = false
	}
	waited := "0"
	if waiting {
		waited = "1"
	}
	switch {
	case w != nil:
		lease := strconv.FormatInt(w.xfer.lease.Milliseconds(), 10)
		if e.shared {
			// Another handle of the owner may have given the hold a longer
			// lease than e's: unlock.lua compares (see there).
			lease = "-" + lease
		}
		args = append(args, lease, w.xfer.req)
	case undo != "":
		args = append(args, waited, undo)
	case waiting || done != "":
		args = append(args, waited)
	}
	if done != "" && undo == "" {
		if w == nil {
			args = append(args, "") // ARGV[7]: no undo
		}
		args = append(args, done)
	}
	keys := []string{e.key, e.fence, e.channel}
	if w != nil {
		keys = keys[:2] // a transfer publishes nothing; two keys mark it (see unlock.lua)
	}
	// A public release of an Unlock while this Client has waiters of its
	// own: they let the other Clients' waiters go first (see armYield).
	yield := local && undo == "" && w == nil && waiting
	if yield {
		e.c.ps.armYield(e.channel, req)
	}
	sent := time.Now()
	res, err := unlockScript.Run(ctx, e.c.rdb, keys, args...).Int64Slice()
	if err == nil && len(res) < 2 {
		err = fmt.Errorf("%w: unlock reply %v", ErrWrongType, res)
	}
	if yield {
		released := err == nil && res[0] == 0 && len(res) > 2 // published: res[2] subscribers heard it
		e.c.ps.endYield(e.channel, req, released && res[2] >= 2, released && res[2] == 0)
	}
	if err != nil {
		e.c.ps.endStreak(e.channel)
		// The transfer may or may not have happened: the waiter retries
		// now, and its attempt recognises a transferred hold as its own.
		// Without a transfer the release may not have happened either: the
		// hold then runs out unannounced, so a waiter retries now too.
		if w != nil {
			if left, acquired, took := e.c.ps.unsure(w); left && (!acquired || took != 0) {
				// The waiter left: a transfer to it would be nobody's for
				// its whole lease. Give it back, if it happened; but not the
				// hold the waiter left with, if it took one with an attempt
				// of its own (a re-entry of the hold this Unlock ended): the
				// transfer, if it happened, is the owner's hold now, with
				// another token, which the give-back names.
				detached(ctx, func(ctx context.Context) {
					if !acquired {
						_, _ = e.unlockAs(ctx, w.xfer.owner, w.xfer.req, 0, false)
					} else {
						w.xfer.giveBackUnless(ctx, took)
					}
				})
			}
		} else if waiting && undo == "" {
			e.c.ps.wakeOne(e.channel)
		}
		if undo == "" {
			// Resent as a public release (no transfer: the waiter retries
			// now): one that did arrive, a release or a transfer, is known
			// by its request id and released nothing twice.
			e.c.resendRelease(ctx, err, token0 != 0, func(ctx context.Context) error {
				_, err := e.unlockReq(ctx, req, owner, "", done, token0, false)
				return err
			})
		} else {
			// An undo is resent too: left undone, the count its
			// acquisition took stays held by nobody (for its lease; for
			// good while the owner keeps re-entering the hold). It names
			// its acquisition: one that did arrive undid it, and the resend
			// finds it gone and undoes nothing twice.
			e.c.resendRelease(ctx, err, true, func(ctx context.Context) error {
				_, err := e.unlockReq(ctx, req, owner, undo, "", token0, false)
				return err
			})
		}
		return 0, convertErr(err)
	}
	n, token := res[0], res[1]
	if w != nil && n == -2 {
		// A transfer refused, nothing changed: the hold has more lease left
		// than the waiter's (another handle of the owner re-entered it on a
		// longer lease; see unlock.lua). Release it publicly.
		e.c.ps.unreserve(w, false)
		e.c.ps.endStreak(e.channel)
		return e.unlockDone(ctx, owner, undo, done, token0, false)
	}
	if n <= 0 && (w == nil || token <= 0) {
		// Released, not by a transfer, or not held: the run of local
		// transfers is over.
		e.c.ps.endStreak(e.channel)
	}
	if w == nil && waiting && n < 0 && undo == "" {
		// The hold was gone already (its lease ran out, or it was lost
		// unannounced): the lock may be free.
		e.c.ps.wakeOne(e.channel)
	}
	if w != nil {
		switch {
		case token > 0:
			if !e.c.ps.deliver(w, token, sent) {
				// The waiter gave up meanwhile: release what it was given,
				// that hold only (the waiter may hold another one, taken by
				// its own attempt after the transferred hold ended).
				detached(ctx, func(ctx context.Context) { _, _ = e.unlockAs(ctx, w.xfer.owner, w.xfer.req, token, false) })
			}
		case n == 0:
			// A retried unlock that had released (or transferred) the lock:
			// the waiter retries and finds out.
			e.c.ps.unreserve(w, true)
			if token == 0 {
				// Released, not handed on: the transfer found the waiter's
				// acquisition undone (see unlock.lua), or this is a resend
				// of one that did. The script published nothing (a
				// transfer names no channel), and the waiter has left:
				// announce the release, as a public one does, or every
				// waiter sleeps to its lease bound while the lock is free.
				detached(ctx, func(ctx context.Context) {
					ctx = own(ctx) // routed as the scripts are (see deadlineHook)
					if pub := e.c.publishCommand(ctx); pub == "SPUBLISH" {
						_ = e.c.rdb.SPublish(ctx, e.channel, req).Err()
					} else {
						_ = e.c.rdb.Publish(ctx, e.channel, req).Err()
					}
				})
			}
		default:
			// Not a full release; or (n < 0) the hold was gone already,
			// unannounced, and the lock may be free: the waiter retries.
			e.c.ps.unreserve(w, n < 0)
		}
	}
	return n, nil
}

// noHold is a fencing token no hold has (tokens, the server clock in
// microseconds or a little past the last one, stay far below 2^62, see
// lua/fence.lua): an undo naming it releases nothing and leaves only its
// tombstone; a release naming it releases nothing either.
const noHold = 1 << 62

// currentToken returns the fencing token of the hold of key that owner holds
// (its owner id in field of), noHold when owner holds none, or 0 when the
// read failed (unknown). A release that names no hold names the one read
// here: a resend after a lost reply must not release a hold the owner took
// after this read (another handle sharing the owner id), also when there
// was none to release.
func currentToken(ctx context.Context, c *Client, key, of, owner string) int64 {
	v := readMaster(ctx, c, key, of, "t")
	if len(v) != 2 {
		return 0
	}
	if o, _ := v[0].(string); o != owner {
		return noHold
	}
	s, _ := v[1].(string)
	t, _ := strconv.ParseInt(s, 10, 64)
	return t
}

// readMaster reads fields of the hash key from the master that holds it
// (see Client.onMaster: a lagging replica could name an older hold). It
// returns nil on an error.
func readMaster(ctx context.Context, c *Client, key string, fields ...string) []any {
	var cmd *redis.SliceCmd
	if err := c.onMaster(ctx, func(p redis.Pipeliner) { cmd = p.HMGet(ctx, key, fields...) }); err != nil {
		return nil
	}
	return cmd.Val()
}

// track starts the watchdog's tracking of a new hold, taken at sent with
// fencing token token. With a token (0: unknown), renewal checks it too:
// a later hold of the same owner id, taken after this one was lost, does
// not keep this one alive.
func (e *excl) track(sent time.Time, token int64) *hold {
	return e.trackNotify(sent, token, nil)
}

// trackNotify is track with a function run when the hold is lost (see
// hold.onLost).
//
// A lost hold also wakes one local waiter of the lock: waiters that queued
// behind it without an attempt (see Client.acquire) sleep on no remaining
// lease, and no release announces a lease that ran out. (The watchdog runs
// this under its mutex; pubsub's is taken inside it and never around it.)
func (e *excl) trackNotify(sent time.Time, token int64, onLost func()) *hold {
	kind, member := exclHold(e.owner, token)
	return e.c.wd.addNotify(e.name, e.key, kind, member, e.lease, e.renew, sent, func() {
		e.c.ps.wakeOne(e.channel)
		if onLost != nil {
			onLost()
		}
	})
}

// exclHold describes a hold of a lock hash to the watchdog (see
// lua/renew.lua): kind 't' with its token, or 'h' by the owner id alone.
func exclHold(owner string, token int64) (kind byte, member string) {
	if token > 0 {
		return 't', tokenArg(token) + ":" + owner
	}
	return 'h', owner
}

func (e *excl) ttl(ctx context.Context) (time.Duration, error) {
	if err := e.check(ctx); err != nil {
		return 0, err
	}
	return e.c.keyTTL(ctx, e.key)
}

func (e *excl) isLocked(ctx context.Context) (bool, error) {
	if err := e.check(ctx); err != nil {
		return false, err
	}
	return e.c.keyExists(ctx, e.key)
}

func (e *excl) forceUnlock(ctx context.Context) (bool, error) {
	if err := e.check(ctx); err != nil {
		return false, err
	}
	n, err := e.c.runOnce(ctx, false, forceUnlockScript, []string{e.key, e.channel, e.fence},
		e.c.publishCommand(ctx), wakeOne, newID(), fenceRetention(e.lease)).Int64()
	return n == 1, convertErr(err)
}

// holdCount returns the owner's hold count.
func (e *excl) holdCount(ctx context.Context) (int, error) {
	if err := e.check(ctx); err != nil {
		return 0, err
	}
	return e.c.holdCount(ctx, e.key, e.owner)
}

// Mutex is a distributed mutual exclusion lock, not reentrant.
//
// Ownership belongs to the handle (or to its WithOwner id), not to a
// goroutine. A Mutex shared by goroutines behaves like sync.Mutex: a second
// Lock on the same handle waits until the first hold is unlocked, and any
// goroutine may call Unlock. To hold the same lock several times, use a
// ReentrantMutex; a Mutex and a ReentrantMutex of the same name are the same
// lock.
//
// An uncontended Lock is one round trip to Redis (one script), and so is an
// Unlock. A contended Lock sleeps until a pub/sub wake-up from the holder's
// Unlock, or until the holder's lease runs out, whichever comes first.
//
// Local transfers. When the last Unlock finds Lock calls of the same Client
// waiting for the lock (any handle, Mutex or ReentrantMutex), it hands the
// lock to the oldest of them inside its own script, with a new fencing token
// and that waiter's lease, and no publish; the waiter holds the lock without
// a round trip of its own (not when that waiter's lease is shorter than what
// the released hold had left, the releasing handle's lease or, under
// WithOwner, a longer one another handle of the owner gave it: waiters of
// other Clients sleep on that, and would sleep on after a shorter one ran
// out; the lock is then released publicly). After 8 such transfers in a row the Unlock
// releases the lock publicly, and this Client's waiters sit out that wake-up
// for up to 2ms, so the waiters of other Clients take their turn. Under
// contention an acquisition thus costs about one round trip. There are no
// local transfers under WithReplicaSync (a transfer is an acquisition no
// WAIT follows).
type Mutex struct {
	e   excl
	sem chan struct{} // the local hold: sync.Mutex semantics among goroutines

	mu    sync.Mutex
	h     *hold
	token int64
}

// Mutex returns a handle on the non-reentrant lock called name. It does not
// talk to Redis. Bad arguments (an empty name, a name starting with '}',
// WithLease(0), WithOwner("")) are reported by the handle's methods as
// errors wrapping ErrInvalidArgument.
func (c *Client) Mutex(name string, opts ...LockOption) *Mutex {
	return &Mutex{e: newExcl(c, name, false, opts), sem: make(chan struct{}, 1)}
}

// Lock blocks until the lock is held by this handle, or ctx is done. A
// failed wait returns an error matching both ErrNotObtained and ctx.Err().
func (m *Mutex) Lock(ctx context.Context) error {
	_, err := m.lock(ctx, true)
	return err
}

// TryLock makes one attempt and reports whether it took the lock. It
// returns (false, nil) when another owner holds the lock, or when another
// goroutine holds it through this same handle.
func (m *Mutex) TryLock(ctx context.Context) (bool, error) {
	return m.lock(ctx, false)
}

// ex returns the handle's lock, nil for a nil handle (its check reports it).
func (m *Mutex) ex() *excl {
	if m == nil {
		return nil
	}
	return &m.e
}

func (m *Mutex) lock(ctx context.Context, block bool) (bool, error) {
	if err := m.ex().check(ctx); err != nil {
		return false, err
	}
	if block {
		select {
		case m.sem <- struct{}{}:
		case <-ctx.Done():
			return false, newWaitError(ctx, nil)
		case <-m.e.c.ctx.Done():
			return false, ErrClosed
		}
	} else {
		select {
		case m.sem <- struct{}{}:
		default:
			return false, nil
		}
	}
	token, sent, ok, err := m.e.lock(ctx, nil, block, true)
	if !ok {
		<-m.sem
		return false, err
	}
	h := m.e.track(sent, token)
	m.mu.Lock()
	m.h, m.token = h, token
	m.mu.Unlock()
	if m.e.shared {
		// The owner holds the lock now: this Client's ReentrantMutex
		// handles of the owner that wait for it re-enter (see kinship);
		// they would otherwise sleep to the previous holder's lease bound.
		m.e.c.ps.wakeKin(m.e.channel, m.e.owner)
	}
	return true, nil
}

// Unlock releases the lock and wakes one waiter. It returns ErrNotHeld when
// this handle does not hold the lock, when the lease ran out, or when the
// hold was lost (Lost is closed). Whatever Unlock returns, the handle no
// longer holds the lock afterwards: if Redis could not be reached, the lock
// expires after its lease. A ctx that has ended already does not keep the
// release from being sent: it goes with a fresh context bounded by 2s, so
// that a deferred Unlock(ctx) releases the lock (see the package doc).
// Nor does a ctx that ends while the release is in flight, a failure
// with no reply from Redis (go-redis's retries failed), or a refusal by a
// busy or loading Redis (BUSY, LOADING: the script did not run): Unlock
// returns then with that error, and the same release (applied once by
// Redis) is sent again in the background with a fresh context bounded by
// 2s (after a short backoff, again while Redis refuses it so).
//
// Ownership is the handle, or its WithOwner id: a handle with a WithOwner
// id that holds nothing itself releases the lock when another handle of the
// same id holds it (whose Lost then closes), and returns ErrNotHeld when
// none does.
func (m *Mutex) Unlock(ctx context.Context) error {
	if err := m.ex().check(ctx); err != nil {
		return err
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	m.mu.Lock()
	h, token := m.h, m.token
	m.h, m.token = nil, 0
	m.mu.Unlock()
	if h == nil {
		if !m.e.shared {
			return ErrNotHeld
		}
		// Ownership is the WithOwner id: release what another handle of
		// it holds (that handle's Lost closes at its next renewal).
		n, err := m.e.unlock(ctx, "", 0, false)
		if err == nil && n < 0 {
			err = ErrNotHeld
		}
		return convertErr(err)
	}
	defer func() { <-m.sem }()
	m.e.c.wd.setReleasing(h, true)
	n, err := m.e.unlock(ctx, "", token, true)
	if m.e.c.wd.remove(h) || n < 0 {
		return ErrNotHeld
	}
	return err
}

// Token returns the fencing token of the current hold, or 0 when the handle
// holds nothing (also once the hold is lost: Lost is closed). Tokens strictly increase, per lock name, at every change of
// owner; they are the Redis server's clock in microseconds, kept increasing
// by a counter that lives for a while after each use. They do not go
// backwards when the counter is lost (FLUSHALL, a restart without
// persistence) or stale (a restart from an older snapshot, a failover),
// unless the server's clock is stepped back. Pass the
// token to the resource the lock protects, and have it reject tokens lower
// than the highest it has seen.
func (m *Mutex) Token() int64 {
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

// Lost returns a channel closed when the current hold ends before Unlock:
// the watchdog found the lock gone or taken by another owner (ForceUnlock,
// expiry, failover), or the lease ran out locally before it was renewed
// (Redis unreachable), or a WithLease lease ran out. It returns nil (a
// channel that never closes) when the handle holds nothing.
func (m *Mutex) Lost() <-chan struct{} {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.h.lostChan()
}

func (m *Mutex) afterLost(lost <-chan struct{}, f func()) (func(), bool) {
	m.mu.Lock()
	h := m.h
	m.mu.Unlock()
	return holdAfterLost(m.e.c.wd, h, lost, f)
}

// TTL returns the remaining lease of the lock, whoever holds it; 0 when it
// is free, -1ns when its key has no expiry (a value redlatch did not write).
func (m *Mutex) TTL(ctx context.Context) (time.Duration, error) { return m.ex().ttl(ctx) }

// IsLocked reports whether anyone holds the lock.
func (m *Mutex) IsLocked(ctx context.Context) (bool, error) { return m.ex().isLocked(ctx) }

// ForceUnlock releases the lock whoever holds it and wakes a waiter. It
// reports whether the lock was held. The former holder's Lost closes at its
// next renewal (a WithLease hold, which is not renewed, when its lease runs
// out on the holder's clock). A call resent after a lost reply (by the
// Redis client, or by ForceUnlock itself, which sends it again within a
// cleanup timeout when no reply came, or when a busy Redis or a migrating
// slot refused go-redis's resend) is applied once and answered with its
// first run's result: it leaves alone a hold taken after that run (its
// record is one of the name's last 32 tombstones, see the README's design
// notes). Meant for operators and tests, not for normal release.
func (m *Mutex) ForceUnlock(ctx context.Context) (bool, error) { return m.ex().forceUnlock(ctx) }

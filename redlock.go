package redlatch

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Redlock is a lock over N independent Redis masters, taken by the Redlock
// algorithm: it is held when a majority (N/2+1) of the masters granted it
// and time remains of its lease. It tolerates the loss of a minority of the
// masters, at any time, without losing mutual exclusion — within the limits
// below.
//
// Each master holds the lock exactly like a Mutex of the same name (the same
// key, the same Lua script), so a Redlock and a Mutex of one name on one
// master exclude each other there.
//
// Acquisition fans out to every master in parallel; each attempt has a timeout
// small against the lease (lease/20, between 10ms and 1s, plus the
// WithReplicaSync timeout of that master's Client and 100ms, how late a WAIT
// may answer), so a dead master costs at most that. The lock is held when at
// least N/2+1 masters granted it and the validity is still positive:
//
//	validity = lease − elapsed − drift, drift = lease·1% + 2ms
//
// elapsed being the time since the fan-out started, on the local monotonic
// clock. When the quorum is not reached, the masters that granted it — and
// every other master, since a reply may have been lost — release it again.
// Unlock releases it on every master.
//
// Without WithLease the lock is renewed by the watchdog of each master's
// Client (the lease on a master is that Client's watchdog timeout; use the
// same on all) and stays held as long as a quorum of masters keeps
// renewing it. Lost closes when fewer than a quorum still hold it, or when
// the validity runs out (a fixed WithLease lease ends, or renewals stopped
// reaching a quorum).
//
// A blocked Lock waits for pub/sub wake-ups from every master (a release on
// any of them) or for the earliest lease end among the holders, and retries
// after a short random delay when two contenders split the masters, so they
// do not collide again in lockstep.
//
// Limits, as in the published analyses of Redlock:
//
//   - Safety rests on time: every master must expire keys at about the rate
//     of the local clock, within the drift allowance. A master whose clock
//     jumps forward (an NTP step, a changed system time) may expire the lock
//     early and let a second client gain a quorum. Run masters with slewed,
//     not stepped, clocks.
//   - A process paused (GC, swap, a stopped VM) past its validity may act
//     after its lock expired. Check Validity before acting and watch Lost.
//     A Redlock has no fencing token: its masters' counters are
//     independent.
//   - A master that restarts without persistence forgets the locks it
//     granted, and may grant them again: with 5 masters, a holder of 3 can
//     lose mutual exclusion when one of its 3 restarts empty. Either run the
//     masters with AOF and appendfsync always, or keep a restarted master
//     out of service for at least the longest lease (delayed restart).
//   - A master failing over to a replica has the same effect as a restart
//     without persistence when the replica had not received the lock: prefer
//     masters without replicas, or WithReplicaSync on their Clients.
//
// A Redlock shared by goroutines behaves like sync.Mutex: a second Lock on
// the handle waits for the first Unlock. It is not reentrant.
type Redlock struct {
	name   string
	nodes  []*excl
	quorum int
	lease  time.Duration // the shortest lease of the masters: validity is computed from it
	renew  bool
	shared bool // WithOwner: other handles may hold the lock as this owner
	err    error
	sem    chan struct{}

	mu sync.Mutex
	h  *redlockHold
	// flying counts the handle's releases and undos on their way to a
	// master, their background resends included (see takeOff). Guarded by
	// mu.
	flying inFlight
}

// takeOff counts a release or undo of the handle's own grant on its way
// to a master, until land: a round of the handle is refused where that
// grant is still there (see lock). It implements flight (see
// Client.resendRelease).
func (r *Redlock) takeOff() {
	r.mu.Lock()
	r.flying.add()
	r.mu.Unlock()
}

func (r *Redlock) land() {
	r.mu.Lock()
	r.flying.done()
	r.mu.Unlock()
}

// inFlight returns a channel closed once none of the handle's releases
// and undos is on its way, or nil when none is now.
func (r *Redlock) inFlight() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.flying.landed()
}

// redlockHold is one hold of a Redlock: the per-master holds tracked by each
// master's watchdog, and what watches them for a lost quorum. No goroutine
// runs per hold: a timer runs check at the end of the validity, and at once
// when a master's hold ends (its watchdog's notification) or its Client
// closes (a context.AfterFunc).
type redlockHold struct {
	r      *Redlock
	req    string  // the acquisition's request id
	holds  []*hold // per master; nil where not granted
	tokens []int64 // per master: the fencing token of its hold; 0 where not granted
	start  time.Time
	end    time.Time     // fixed lease: start + lease − drift
	lost   chan struct{} // closed when the quorum or the validity is lost
	timer  *time.Timer   // runs check
	// woken is set by wake: a master's hold ended since check last looked,
	// and check must run again even if it re-armed the timer for later.
	woken atomic.Bool

	mu      sync.Mutex    // serialises track, check and stop
	stopped bool          // Unlock came: check does nothing more
	unwatch []func() bool // stop the watches of the masters' Clients
	notify  lossCallbacks // run when lost closes (see afterLost); guarded by mu
}

// NewRedlock returns a Redlock called name over the masters of clients, one
// Client per independent Redis master (not replicas of one another, not
// nodes of one cluster). It does not talk to Redis. Bad arguments — no
// clients, a nil client, the same Client or Redis client twice, an empty
// name or one starting with '}', WithLease(0) or any lease no longer than
// the drift allowance (lease·1% + 2ms) — are reported by the methods as
// errors wrapping ErrInvalidArgument. Options are those of Mutex: WithLease
// and WithOwner.
func NewRedlock(name string, clients []*Client, opts ...LockOption) *Redlock {
	o := newLockOptions(name, opts)
	r := &Redlock{name: name, shared: o.shared, err: o.err, sem: make(chan struct{}, 1)}
	if len(clients) == 0 {
		r.err = invalidArg("clients", "is empty")
		return r
	}
	seen := make(map[*Client]bool)
	seenRdb := make(map[any]bool)
	for _, c := range clients {
		if c == nil {
			r.err = invalidArg("clients", "contains a nil Client")
			return r
		}
		// A Redis client that is not comparable (a wrapper struct with a
		// slice field, say) cannot be a map key: hashing it panics. It is
		// known by its shape instead (see shape): two copies of one wrapper
		// around one go-redis client are alike.
		var key any = c.rdb
		if !isNil(c.rdb) && !reflect.ValueOf(c.rdb).Comparable() {
			var b strings.Builder
			shape(&b, reflect.ValueOf(&c.rdb).Elem())
			key = b.String()
		}
		if seen[c] || (!isNil(c.rdb) && seenRdb[key]) {
			r.err = invalidArg("clients", "contains the same Client or Redis client twice")
			return r
		}
		seen[c] = true
		if !isNil(c.rdb) {
			seenRdb[key] = true
		}
	}
	all := append(opts[:len(opts):len(opts)], WithOwner(o.owner))
	for _, c := range clients {
		e := newExcl(c, name, false, all)
		e.quietUndo = true
		if r.err == nil {
			r.err = e.err
		}
		r.nodes = append(r.nodes, &e)
		if r.lease == 0 || e.lease < r.lease {
			r.lease = e.lease
		}
		r.renew = e.renew
	}
	if r.err == nil && r.lease <= r.drift() {
		// No acquisition could ever be valid: Lock would retry until ctx.
		r.err = invalidArg("lease", "must exceed the clock drift allowance (lease·1% + 2ms)")
	}
	r.quorum = len(clients)/2 + 1
	return r
}

// shape writes v's type and its fields, read in place and never through a
// reference (a map, a pointer, a slice's elements), which may be changing
// meanwhile under locks v does not know of: a reference is written as its
// address. Two copies of one value have the same shape.
func shape(b *strings.Builder, v reflect.Value) {
	switch v.Kind() {
	case reflect.Interface:
		if !v.IsNil() {
			fmt.Fprintf(b, "%s(", v.Elem().Type())
			shape(b, v.Elem())
			b.WriteString(")")
		}
	case reflect.Struct:
		for i := range v.NumField() {
			shape(b, v.Field(i))
		}
	case reflect.Array:
		for i := range v.Len() {
			shape(b, v.Index(i))
		}
	case reflect.Slice:
		fmt.Fprintf(b, "%#x/%d", v.Pointer(), v.Len())
	case reflect.Map, reflect.Pointer, reflect.Chan, reflect.Func, reflect.UnsafePointer:
		fmt.Fprintf(b, "%#x", v.Pointer())
	default: // a bool, a number or a string
		fmt.Fprintf(b, "%q", fmt.Sprint(v))
	}
	b.WriteString(" ")
}

// check returns the error of bad input or of a closed Client.
func (r *Redlock) check(ctx context.Context) error {
	if r == nil {
		return invalidArg("redlock", "is nil")
	}
	if r.err != nil {
		return r.err
	}
	if len(r.nodes) == 0 {
		// A zero Redlock, not made by NewRedlock: no masters, no quorum,
		// and a nil semaphore that Lock would wait on until ctx ends.
		return invalidArg("redlock", "has no masters: make it with NewRedlock")
	}
	for _, e := range r.nodes {
		if err := e.c.check(); err != nil {
			return err
		}
	}
	return ctxArg(ctx)
}

// drift is the clock drift allowance: lease·1% + 2ms.
func (r *Redlock) drift() time.Duration {
	return driftOf(r.lease)
}

// driftOf is the clock drift allowance of a lease: lease·1% + 2ms.
func driftOf(lease time.Duration) time.Duration {
	return lease/100 + 2*time.Millisecond
}

// nodeTimeout bounds one attempt on master i: small against the lease,
// plus, under WithReplicaSync, the WAIT's timeout and waitLateness.
func (r *Redlock) nodeTimeout(i int) time.Duration {
	d := min(max(r.lease/20, 10*time.Millisecond), time.Second)
	if rt := r.nodes[i].c.opts.replicaTimeout; rt > 0 {
		d += rt + waitLateness
	}
	return d
}

// attemptTimeout is the longest node timeout of the masters: how long a
// round, a release or an Unlock waits for all of them.
func (r *Redlock) attemptTimeout() time.Duration {
	d := time.Duration(0)
	for i := range r.nodes {
		d = max(d, r.nodeTimeout(i))
	}
	return d
}

// waitLateness is how late a WAIT may answer after its timeout: the server
// checks the timeouts of blocked clients from its timers, every 1/hz s
// (100ms by default). An attempt cut before it answered counted as a
// master with an unknown outcome, not as one whose replicas did not
// acknowledge, and a Redlock whose replicas were gone retried for seconds
// instead of returning ErrNotReplicated at once.
const waitLateness = 100 * time.Millisecond

// Lock blocks until the Redlock is held, or ctx is done. A failed wait
// returns an error matching both ErrNotObtained and ctx.Err(). Masters that
// cannot be reached do not end the wait: Lock retries until a quorum
// grants the lock. Masters whose replicas do not acknowledge it
// (WithReplicaSync) do, once too many for a quorum: Lock then returns at
// once with their errors, which match ErrNotReplicated.
func (r *Redlock) Lock(ctx context.Context) error {
	_, err := r.lock(ctx, true)
	return err
}

// TryLock makes one attempt on every master and reports whether it took
// the lock. It returns (false, nil) when other owners hold the lock on so
// many masters that no quorum was possible, and (false, err) with err
// wrapping ErrNotObtained when the quorum failed for other reasons
// (unreachable masters, the validity spent by a slow acquisition, masters
// still holding the handle's own earlier grant, whose release is on its
// way to them); err then also wraps the masters' errors. It returns (false, nil) as well when
// another goroutine holds the lock through this same handle.
func (r *Redlock) TryLock(ctx context.Context) (bool, error) {
	return r.lock(ctx, false)
}

// round is the outcome of one fan-out.
type round struct {
	req      string // the request id of every master's attempt
	start    time.Time
	granted  []bool
	tokens   []int64 // per granting master: its hold's fencing token
	unknown  []bool  // no reply: the master may have granted it
	busy     int     // masters where another owner holds the lock
	minPTTL  int64   // the earliest end of another owner's hold, ms; -1 none
	errs     []error
	validity time.Duration
	fatal    error // an error that retrying cannot cure on its master
	fatals   int   // masters that answered with such an error
	// unreplicated counts the masters that granted the lock but whose
	// replicas did not acknowledge it (ErrNotReplicated; released again).
	unreplicated int
	// own counts the masters that refused the round for a hold of the
	// handle's own owner id: not another owner's (a handle that does not
	// share its id holds nothing while it acquires), but a grant of its own
	// whose release or undo is still on its way (see lock).
	own int
}

func (rd *round) count() int {
	n := 0
	for _, g := range rd.granted {
		if g {
			n++
		}
	}
	return n
}

// fanOut tries every master in parallel with request id req and waits for
// every reply or its node timeout.
func (r *Redlock) fanOut(ctx context.Context, req string) *round {
	n := len(r.nodes)
	rd := &round{req: req, start: time.Now(), granted: make([]bool, n), tokens: make([]int64, n),
		unknown: make([]bool, n), minPTTL: -1}
	type reply struct {
		i     int
		ok    bool
		token int64
		pttl  int64
		own   bool
		err   error
	}
	replies := make(chan reply, n) // buffered: a straggler never blocks
	longest := r.attemptTimeout()
	for i, e := range r.nodes {
		d := r.nodeTimeout(i)
		go func() {
			nctx, cancel := context.WithTimeout(ctx, d)
			defer cancel()
			ok, token, pttl, own, err := e.attemptOwn(nctx, req)
			replies <- reply{i, ok, token, pttl, own, err}
		}()
	}
	// A Redis client that ignores context deadlines may answer late: count
	// such a master as failed (with an unknown outcome) rather than wait.
	t := time.NewTimer(longest + 50*time.Millisecond)
	defer t.Stop()
	got := make([]bool, n)
	for k := 0; k < n; k++ {
		select {
		case rp := <-replies:
			got[rp.i] = true
			switch {
			case rp.err != nil:
				rd.errs = append(rd.errs, fmt.Errorf("redlock master %d: %w", rp.i, convertErr(rp.err)))
				if !isReplyError(rp.err) && !errors.Is(rp.err, ErrNotReplicated) {
					rd.unknown[rp.i] = true
				}
				if errors.Is(convertErr(rp.err), ErrWrongType) {
					rd.fatal = convertErr(rp.err)
					rd.fatals++
				}
				if errors.Is(rp.err, ErrNotReplicated) {
					rd.unreplicated++
				}
			case rp.ok:
				rd.granted[rp.i] = true
				rd.tokens[rp.i] = rp.token
			case rp.own && !r.shared:
				rd.own++
			default:
				rd.busy++
				if rd.minPTTL < 0 || rp.pttl < rd.minPTTL {
					rd.minPTTL = rp.pttl
				}
			}
		case <-t.C:
			for i := range got {
				if !got[i] {
					rd.unknown[i] = true
					rd.errs = append(rd.errs, fmt.Errorf("redlock master %d: no reply within %v", i, longest))
				}
			}
			k = n
		case <-ctx.Done():
			// The Redis client may not see a cancellation before its read
			// deadline: count the masters that have not answered yet as
			// failed, with an unknown outcome (the round is undone).
			for i := range got {
				if !got[i] {
					rd.unknown[i] = true
					rd.errs = append(rd.errs, fmt.Errorf("redlock master %d: %w", i, ctx.Err()))
				}
			}
			k = n
		}
	}
	rd.validity = r.lease - time.Since(rd.start) - r.drift()
	return rd
}

// release undoes the acquisition of round rd on every master (it releases
// only what that request took) and waits for the replies of the masters
// that granted it or did not answer for at most the node timeout; slower
// releases go on in the background, bounded. When no round follows (retry
// false: a TryLock, a hold given back), it waits only for the masters that
// granted the round: the others (frozen, unreachable) would hold up a call
// that is over. Once ctx has ended it waits for none: a granting master
// slow to take its undo held Lock and TryLock up to the attempt timeout
// past their ctx. (A round that follows is refused where this round's
// grant, by the same owner id, is still there.)
func (r *Redlock) release(ctx context.Context, rd *round, retry bool) {
	var all, answered sync.WaitGroup
	for i, e := range r.nodes {
		// Only a master that granted the round, or may have (no reply),
		// may still hold the grant that a round that follows would be
		// refused for: the undos of the others (refused it, or failed with
		// a reply), sent in case a copy of the attempt comes late, are not
		// waited for. A migrating slot refuses every release script for
		// the whole cleanup timeout, also where the attempt ran (the lock
		// held there, its keys moved), and the call waited the attempt
		// timeout for an undo that could free nothing of its own.
		held := rd.granted[i] || rd.unknown[i]
		known := rd.granted[i]
		if held {
			all.Add(1)
		}
		if known {
			answered.Add(1)
		}
		// Close waits for the undos that outlive the call (see Client.waits),
		// also once it has begun: the call is registered (see lock), and
		// with its ctx ended it does not wait for them (enterWait failed
		// then, and Close returned with an undo still on its way, which
		// failed once the Redis client was closed, the grant left held by
		// nobody for its lease: TestRedlockCloseWaitsForUndoAfterCtx).
		registered := e.c.enterResend()
		r.takeOff()
		go func() {
			if registered {
				defer e.c.leaveWait()
			}
			defer r.land()
			if held {
				defer all.Done()
			}
			if known {
				defer answered.Done()
			}
			detached(r.flown(ctx), func(ctx context.Context) { _, _ = e.unlock(ctx, rd.req, 0, false) })
		}()
	}
	done, knownDone := make(chan struct{}), make(chan struct{})
	go func() { all.Wait(); close(done) }()
	go func() { answered.Wait(); close(knownDone) }()
	t := time.NewTimer(r.attemptTimeout())
	defer t.Stop()
	select {
	case <-knownDone:
	case <-t.C:
		return
	case <-ctx.Done():
		// The call is over: its undos go on in the background, counted in
		// flight (the handle's next call waits for them where its round is
		// refused, see lock) and waited for by Close (see Client.waits).
		return
	}
	if !retry {
		return
	}
	select {
	case <-done:
	case <-t.C:
	case <-ctx.Done():
	}
}

// flown returns ctx carrying the handle as the flight of the releases
// sent with it (see takeOff).
func (r *Redlock) flown(ctx context.Context) context.Context {
	return context.WithValue(ctx, flightKey{}, flight(r))
}

func (r *Redlock) lock(ctx context.Context, block bool) (bool, error) {
	if err := r.check(ctx); err != nil {
		return false, err
	}
	// Close waits for this call's give-back below (see Client.waits).
	for i, e := range r.nodes {
		if !e.c.enterWait() {
			for _, d := range r.nodes[:i] {
				d.c.leaveWait()
			}
			return false, ErrClosed
		}
	}
	defer func() {
		for _, e := range r.nodes {
			e.c.leaveWait()
		}
	}()
	if block {
		// Wait for the handle's own hold to end, for ctx, or for any of
		// the Clients to close.
		cases := []reflect.SelectCase{
			{Dir: reflect.SelectSend, Chan: reflect.ValueOf(r.sem), Send: reflect.ValueOf(struct{}{})},
			{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())},
		}
		for _, e := range r.nodes {
			cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(e.c.ctx.Done())})
		}
		switch chosen, _, _ := reflect.Select(cases); chosen {
		case 0:
		case 1:
			return false, newWaitError(ctx, nil)
		default:
			return false, ErrClosed
		}
	} else {
		select {
		case r.sem <- struct{}{}:
		default:
			return false, nil
		}
	}
	ok := false
	defer func() {
		if !ok {
			<-r.sem
		}
	}()
	// The undos of the handle's failed rounds and the releases of its
	// last hold, not waited for (see release, Unlock): a round may be
	// refused where they are still on their way. The first round is sent
	// at once, and only when it fails are they waited for (at most the
	// attempt timeout) and the round tried again, once, whether they are
	// done or not (one on a frozen master never is, and the others may
	// be): waiting before it made every call of a handle with one master
	// frozen wait the attempt timeout for its last Unlock's release there.
	// A call with none on its way when it starts does not wait: its
	// failed round's own undos are no handle's earlier grant.
	retry := r.inFlight() != nil

	var ws []*waiter
	defer func() {
		for _, w := range ws {
			if w != nil {
				w.leave(!ok)
			}
		}
	}()
	var last error
	for {
		if err := r.check(ctx); err != nil {
			return false, err
		}
		for _, w := range ws {
			if w != nil {
				// Wake-ups already pending (each master publishes its own
				// release) are answered by this very attempt.
				select {
				case <-w.sig:
				default:
				}
			}
		}
		if ctx.Err() != nil {
			// See Client.acquire: a round with an ended ctx would reach no
			// master, and its release would leave a tombstone on each.
			return false, newWaitError(ctx, last)
		}
		req := newID()
		rd := r.fanOut(ctx, req)
		if rd.count() >= r.quorum && rd.validity > 0 {
			if r.openGrants(rd) < r.quorum {
				// The Clients of so many granting masters were closed
				// while the round was on its way that the hold would be
				// lost at once, renewed by no watchdog: the wait was in
				// progress at Close (see Client.Close). Give it back.
				r.release(ctx, rd, false)
				return false, ErrClosed
			}
			r.track(rd)
			ok = true
			return true, nil
		}
		r.release(ctx, rd, block)
		if rd.fatals > len(r.nodes)-r.quorum {
			// Too many masters can never grant it: no quorum is possible.
			// A minority of them is tolerated, as unreachable masters are.
			return false, rd.fatal
		}
		if len(rd.errs) > 0 {
			last = errors.Join(rd.errs...)
		}
		if rd.fatals+rd.unreplicated > len(r.nodes)-r.quorum {
			// As a Mutex's Lock does (see WithReplicaSync): too many
			// masters' replication is broken for a quorum, the lock is not
			// busy. A minority of them is tolerated. A ctx that ended
			// meanwhile (the round's release outlasts it) makes it a
			// failed wait, as failedAttempt does for a Mutex.
			if ctxEnded(ctx) {
				return false, newWaitError(ctx, last)
			}
			return false, last
		}
		if ctx.Err() != nil {
			return false, newWaitError(ctx, last)
		}
		if err := r.check(ctx); err != nil {
			return false, err
		}
		contended := rd.busy > len(r.nodes)-r.quorum
		if retry && (block || !contended) {
			// See above: the round may have been refused by the handle's
			// own grants whose releases are on their way, this round's
			// own undos included (a TryLock's release waits for no
			// unknown master's): wait for them, then try again, once. (Not
			// a TryLock that other owners' holds refused whatever its own
			// did: the wait could not help it.)
			retry = false
			if landed := r.inFlight(); landed != nil {
				t := time.NewTimer(r.attemptTimeout())
				select {
				case <-landed:
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
					return false, newWaitError(ctx, last)
				}
				t.Stop()
			}
			continue
		}
		if !block {
			if contended {
				return false, nil
			}
			why := fmt.Sprintf("%d of %d masters granted the lock, %d needed", rd.count(), len(r.nodes), r.quorum)
			if rd.own > 0 {
				why += fmt.Sprintf(" (%d refused it for the handle's own earlier grant, its release still on its way)", rd.own)
			}
			if rd.count() >= r.quorum {
				why = fmt.Sprintf("the acquisition took %v, longer than the validity allows", time.Since(rd.start))
			}
			return false, errors.Join(fmt.Errorf("%w: redlock %q: %s", ErrNotObtained, r.name, why), last)
		}

		// Sleep until a release on any master, the earliest end of another
		// owner's hold, or a short backoff when masters were unreachable.
		bound := r.lease
		if rd.minPTTL >= 0 {
			bound = min(bound, r.nodes[0].c.retryBound(rd.minPTTL))
		}
		if !contended || rd.busy == 0 {
			bound = min(bound, r.backoff())
		}
		if ws == nil {
			ws = r.join(ctx, bound)
			continue // retry at once: a release may have come before the subscription
		}
		woken, err := waitAny(ctx, ws, bound, last)
		if err != nil {
			return false, err
		}
		if woken && rd.count() > 0 {
			// A split vote: both contenders were woken by the same
			// releases; a random delay keeps them from colliding again.
			if err := sleepCtx(ctx, r.backoff()/2, last); err != nil {
				return false, err
			}
		}
	}
}

// openGrants returns how many masters granted round rd whose Client is
// not closed.
func (r *Redlock) openGrants(rd *round) int {
	n := 0
	for i, e := range r.nodes {
		if rd.granted[i] && !e.c.closed.Load() {
			n++
		}
	}
	return n
}

// backoff is a random retry delay: up to lease/3, at most 200ms, at least 5ms.
func (r *Redlock) backoff() time.Duration {
	hi := min(max(r.lease/3, 10*time.Millisecond), 200*time.Millisecond)
	return 5*time.Millisecond + rand.N(hi)
}

// join subscribes to the lock's wake-up channel on every master, in
// parallel, and waits for the confirmations for at most the node timeout:
// an unreachable master must not hold up the others. The waiters are
// registered either way.
func (r *Redlock) join(ctx context.Context, bound time.Duration) []*waiter {
	ws := make([]*waiter, len(r.nodes))
	var wg sync.WaitGroup
	for i, e := range r.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, err := e.c.ps.join(ctx, e.channel, min(bound, r.nodeTimeout(i)))
			if err == nil {
				ws[i] = w
			}
		}()
	}
	wg.Wait()
	return ws
}

// waitAny sleeps until a wake-up on any of ws, or bound, or the end of ctx
// or of one of the Clients. It reports whether a wake-up ended the sleep.
// last is the masters' last errors, for the error of a wait ctx ended.
func waitAny(ctx context.Context, ws []*waiter, bound time.Duration, last error) (bool, error) {
	t := time.NewTimer(bound)
	defer t.Stop()
	cases := []reflect.SelectCase{
		{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(t.C)},
		{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())},
	}
	const first = 2
	var sigs []int
	for _, w := range ws {
		if w == nil {
			continue
		}
		sigs = append(sigs, len(cases))
		cases = append(cases,
			reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(w.sig)},
			reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(w.p.closing)})
	}
	chosen, _, _ := reflect.Select(cases)
	switch {
	case chosen == 0:
		return false, nil
	case chosen == 1:
		return false, newWaitError(ctx, last)
	case (chosen-first)%2 == 1:
		return false, ErrClosed
	}
	return true, nil
}

// sleepCtx sleeps for d or until ctx ends (an error carrying last).
func sleepCtx(ctx context.Context, d time.Duration, last error) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return newWaitError(ctx, last)
	}
}

// track records a granted acquisition: a hold per granting master in that
// master's watchdog, and the watch for the quorum (see redlockHold). Each
// master's hold is renewed and released by its own fencing token, so a hold
// lost on a master stays lost there even when a handle sharing the owner id
// takes that master's lock at once, and the later hold is left alone.
func (r *Redlock) track(rd *round) {
	h := &redlockHold{
		r: r, req: rd.req, holds: make([]*hold, len(r.nodes)), tokens: rd.tokens, start: rd.start,
		end:  rd.start.Add(r.lease - r.drift()),
		lost: make(chan struct{}),
	}
	h.timer = time.AfterFunc(time.Hour, h.check) // armed by the check below
	// A notification during the loop (a reply after its lease, a Client
	// already closed) runs check, which waits for the holds to be complete.
	h.mu.Lock()
	for i, e := range r.nodes {
		if !rd.granted[i] {
			continue
		}
		hd := e.trackNotify(rd.start, rd.tokens[i], h.wake)
		h.holds[i] = hd
		wd := e.c.wd
		h.unwatch = append(h.unwatch, context.AfterFunc(e.c.ctx, func() {
			// That master's Client was closed: its hold is no longer
			// renewed and cannot count towards the quorum any more.
			// Marked releasing, so that remove does not wait for a
			// renewal in flight (up to a renewal period on a frozen
			// master) before the quorum check learns of it (see check).
			wd.setReleasing(hd, true)
			wd.remove(hd)
			h.wake()
		}))
	}
	h.mu.Unlock()
	r.mu.Lock()
	r.h = h
	r.mu.Unlock()
	h.check()
}

// nodeDeadline returns when master i's hold ends unless renewed, and false
// when it is gone.
func (h *redlockHold) nodeDeadline(i int) (time.Time, bool) {
	hd := h.holds[i]
	if hd == nil || hd.isLost() {
		return time.Time{}, false
	}
	w := h.r.nodes[i].c.wd
	w.mu.Lock()
	defer w.mu.Unlock()
	if hd.done {
		return time.Time{}, false
	}
	return hd.deadline, true
}

// validUntil returns when the hold's validity ends: for a fixed lease,
// start + lease − drift; for a renewed one, the quorum-th latest of the
// deadlines of the masters still holding it, each less the drift of that
// master's lease (the shortest lease's drift understated a longer lease's).
// Zero when fewer than a quorum of masters hold it.
func (h *redlockHold) validUntil() time.Time {
	if !h.r.renew {
		if h.live() < h.r.quorum {
			return time.Time{}
		}
		return h.end
	}
	var ds []time.Time
	for i := range h.holds {
		if d, ok := h.nodeDeadline(i); ok {
			ds = append(ds, d.Add(-driftOf(h.r.nodes[i].lease)))
		}
	}
	if len(ds) < h.r.quorum {
		return time.Time{}
	}
	sort.Slice(ds, func(a, b int) bool { return ds[a].After(ds[b]) })
	return ds[h.r.quorum-1]
}

// live counts the masters still holding the lock, as far as known.
func (h *redlockHold) live() int {
	n := 0
	for i := range h.holds {
		if _, ok := h.nodeDeadline(i); ok {
			n++
		}
	}
	return n
}

func (h *redlockHold) isLost() bool {
	select {
	case <-h.lost:
		return true
	default:
		return false
	}
}

// wake has check run at once. It is a master hold's onLost, run with that
// watchdog's mutex held: it only sets woken and resets the timer.
func (h *redlockHold) wake() {
	h.woken.Store(true)
	h.timer.Reset(0)
}

// check closes lost when fewer than a quorum of masters hold the lock or
// the validity has run out, and otherwise arms the timer for the end of the
// validity (renewals move it on: check then arms it again). On a loss it
// stops the renewals on the masters still holding it: a minority hold
// protects nothing, and Unlock (or the lease) releases it.
func (h *redlockHold) check() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped || h.isLost() {
		return
	}
	h.woken.Store(false)
	until := h.validUntil()
	if time.Now().Before(until) {
		h.timer.Reset(time.Until(until))
		if h.woken.Load() {
			// A hold ended while until was computed, and this Reset may
			// have replaced wake's: look again at once.
			h.timer.Reset(0)
		}
		return
	}
	close(h.lost)
	h.notify.fire()
	h.r.nodes[0].c.opts.logger.Warn("redlatch: redlock lost",
		"name", h.r.name, "masters holding", h.live(), "quorum", h.r.quorum)
	for i, hd := range h.holds {
		// Marked releasing, so that remove does not wait for a renewal in
		// flight (up to a renewal period on a frozen master) under h.mu,
		// which Unlock needs: that renewal keeps nothing anyone tracks,
		// and Unlock (or the lease) releases what it kept.
		h.r.nodes[i].c.wd.setReleasing(hd, true)
		h.r.nodes[i].c.wd.remove(hd)
	}
	h.unwatchAll()
}

// stop ends the watch for Unlock: no check acts after it returns. It
// reports whether the hold was still valid; when it was not, Lost is closed
// here, as the check that had not run yet (its timer late, or a quorum's
// Clients closed a moment ago) would have: Unlock reports the hold lost.
func (h *redlockHold) stop() (valid bool) {
	h.mu.Lock()
	h.stopped = true
	valid = !h.isLost() && time.Now().Before(h.validUntil())
	if !valid && !h.isLost() {
		close(h.lost)
		h.notify.fire()
	}
	h.mu.Unlock()
	h.timer.Stop()
	h.unwatchAll()
	return valid
}

func (h *redlockHold) unwatchAll() {
	for _, f := range h.unwatch {
		f()
	}
}

// Unlock releases the lock on every master and wakes waiters. It returns
// ErrNotHeld when this handle does not hold the lock, or when it was lost
// (Lost closed, or the validity ran out) before Unlock. It returns an error
// joining the masters' errors when fewer than a quorum confirmed the
// release for want of an answer. A master's release whose ctx (or the
// master's own timeout) ended on its way is sent to it again in the
// background with a fresh context bounded by 2s, as Mutex.Unlock's is; on
// a master it does not reach either, the lock expires after its lease.
// Unlock does not wait for a master that does not answer (frozen,
// unreachable) once a quorum has confirmed the release and the attempt
// timeout (see the type's documentation) has passed: that master's release
// goes on in the background, bounded. Whatever Unlock returns, the handle
// no longer holds the lock. A hold whose Clients were closed is released
// all the same (Close leaves their Redis clients open), and Unlock reports
// it lost (ErrNotHeld: Close closed Lost), not ErrClosed.
//
// Ownership is the handle, or its WithOwner id: a handle with a WithOwner
// id that holds nothing itself releases the lock a quorum of masters holds
// for that id (another handle's, whose Lost then closes).
func (r *Redlock) Unlock(ctx context.Context) error {
	if r == nil {
		return invalidArg("redlock", "is nil")
	}
	if r.err != nil {
		return r.err
	}
	if err := ctxArg(ctx); err != nil {
		return err // before the hold is taken from the handle: it stays held
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	r.mu.Lock()
	h := r.h
	r.h = nil
	r.mu.Unlock()
	if h == nil {
		if err := r.check(ctx); err != nil {
			return err // a closed Client: ErrClosed
		}
	}
	// A hold is released even when some of the Clients are closed (Close
	// leaves their Redis clients open): the other masters' watchdogs would
	// renew it for ever.
	valid := r.shared
	if h != nil {
		defer func() { <-r.sem }()
		valid = h.stop()
	}
	if h == nil && !r.shared {
		return ErrNotHeld
	}
	released, errs := r.unlockAll(ctx, h)
	switch {
	case !valid:
		return ErrNotHeld
	case released >= r.quorum:
		return nil
	case len(errs) > 0:
		return errors.Join(errs...)
	}
	return ErrNotHeld
}

// unlockAll sends the release of hold h to every master, or with h nil the
// release of whatever the owner id holds there, and returns how many
// masters released something and the errors of those that did not answer,
// counting each release on its way, the resends of those that failed
// included, until it lands (see takeOff).
func (r *Redlock) unlockAll(ctx context.Context, h *redlockHold) (released int, errs []error) {
	type reply struct {
		i   int
		n   int64
		err error
	}
	n := len(r.nodes)
	ch := make(chan reply, n) // buffered: a straggler never blocks
	// A straggler's release outlives an early return: a cleanup context
	// (an Unlock whose ctx had ended), which Unlock cancels on return, must
	// not cut it short, since a release sent with one is not resent.
	gctx := ctx
	var pending sync.WaitGroup
	pending.Add(n)
	stop := func() {}
	if dl, ok := ctx.Deadline(); ok && ctx.Value(cleanupKey{}) != nil {
		gctx, stop = context.WithDeadline(context.WithoutCancel(ctx), dl)
	}
	// The releases, and the resends of those that fail on their way,
	// count as the handle's in flight (see takeOff): its next call's round
	// is refused where the hold is still there.
	gctx = r.flown(gctx)
	go func() { pending.Wait(); stop() }()
	for i, e := range r.nodes {
		if h != nil {
			e.c.wd.setReleasing(h.holds[i], true)
		}
		// A straggler's release goes on after Unlock returns: Close waits
		// for it (see Client.waits), so that the Redis client may be
		// closed next. A closed Client's master is released all the same.
		registered := e.c.enterWait()
		r.takeOff()
		go func() {
			if registered {
				defer e.c.leaveWait()
			}
			defer r.land()
			defer pending.Done()
			uctx, cancel := context.WithTimeout(gctx, max(4*r.nodeTimeout(i), 100*time.Millisecond))
			defer cancel()
			// Unlock goes to every master. A granting master's hold is
			// released by its token. Any other may have granted it too (a
			// lost reply): there the acquisition itself is undone, which
			// releases only what that request took.
			undo, token := "", int64(0)
			if h != nil {
				token = h.tokens[i]
				if h.holds[i] == nil {
					undo = h.req
				}
			}
			n, err := e.unlock(uctx, undo, token, false)
			if err != nil && undo != "" {
				// An undo whose ctx ended on its way may never have
				// reached the master, which may hold what the lost reply
				// granted: sent again in the background, as a release is
				// (see unlockReq), or that master stays locked by nobody
				// for the whole lease.
				e.c.resendRelease(uctx, err, true, func(ctx context.Context) error { _, err := e.unlock(ctx, undo, token, false); return err })
			}
			ch <- reply{i, n, err}
		}()
	}
	replies := make([]reply, n)
	got := make([]bool, n)
	// A quorum's releases are enough for Unlock to return once the others
	// have had the node timeout: a frozen or unreachable master's release
	// goes on in the background, bounded, as after ctx ends. (Waiting out
	// its own bound, four node timeouts, made every Unlock of a Redlock
	// with one master down take 4s at the default lease.)
	longest := r.attemptTimeout()
	patience := time.NewTimer(longest)
	defer patience.Stop()
	impatient, ok := false, 0
	// unanswered counts the masters that have not answered as failed with
	// err; their releases go on in the background, bounded by their own
	// timeout.
	unanswered := func(err error) {
		for i := range got {
			if !got[i] {
				replies[i] = reply{i, 0, err}
			}
		}
	}
wait:
	for k := 0; k < n; {
		if impatient && ok >= r.quorum {
			unanswered(fmt.Errorf("no reply within %v (its release goes on in the background)", longest))
			break
		}
		select {
		case rp := <-ch:
			k++
			got[rp.i], replies[rp.i] = true, rp
			if rp.err == nil && rp.n >= 0 {
				ok++
			}
		case <-patience.C:
			impatient = true // not a quorum yet: wait for the rest, or ctx
		case <-ctx.Done():
			// The Redis client may not see a cancellation before its read
			// deadline (a frozen master).
			unanswered(ctx.Err())
			break wait
		}
	}
	for i, e := range r.nodes {
		if h != nil {
			e.c.wd.remove(h.holds[i])
		}
		switch rp := replies[i]; {
		case rp.err != nil:
			errs = append(errs, fmt.Errorf("redlock master %d: %w", i, rp.err))
		case rp.n >= 0:
			released++
		}
	}
	return released, errs
}

// Lost returns a channel closed when the current hold ends before Unlock:
// fewer than a quorum of masters still hold the lock (a renewal found it
// gone, or their leases ran out unrenewed, or their Clients were closed),
// or the validity ran out. It returns nil (a channel that never closes)
// when the handle holds nothing.
func (r *Redlock) Lost() <-chan struct{} {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.h == nil {
		return nil
	}
	return r.h.lost
}

func (r *Redlock) afterLost(lost <-chan struct{}, f func()) (func(), bool) {
	r.mu.Lock()
	h := r.h
	r.mu.Unlock()
	var current <-chan struct{}
	if h != nil {
		current = h.lost
	}
	return notifyLoss(lost, current, f, func() func() { return h.notify.add(&h.mu, h.lost, f) })
}

// Validity returns the remaining validity of the current hold: the time
// during which mutual exclusion is guaranteed (within the limits in the
// type's documentation), lease − elapsed − drift for a fixed lease, or from
// the latest renewals that a quorum of masters acknowledged for a renewed
// one. It returns 0 when the handle holds nothing or the hold was lost.
func (r *Redlock) Validity() time.Duration {
	if r == nil {
		return 0
	}
	r.mu.Lock()
	h := r.h
	r.mu.Unlock()
	if h == nil || h.isLost() {
		return 0
	}
	return max(time.Until(h.validUntil()), 0)
}

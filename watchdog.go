package redlatch

import (
	"context"
	_ "embed"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

//go:embed lua/renew.lua
var renewLua string

var renewScript = newScript(renewLua)

// renewBatch is the most keys one renewal script call carries. With it, 5,000
// held locks on one Redis cost 50 script calls per renewal period, sent
// pipelined in one round trip.
const renewBatch = 100

// hold is one lease the Client tracks: a lock hold, a read hold, a set of
// permits or a queue place. The watchdog renews it (unless it has a fixed
// lease) and closes lost when it ends before its holder released it.
//
// Every field but lost is guarded by watchdog.mu once the hold is added.
type hold struct {
	name   string // the primitive's name, for logs
	key    string // the key whose lease this is
	kind   byte   // 'h', 't', 'z', 'p', 's', 'f' or 'g', see lua/renew.lua
	member string // owner id ('h'), "<token>:<owner id>" ('t'), sorted-set member ('z', 'p'), "<length of old>:<old><new>" ('s'), field ('f') or "<guard>:<field>" ('g')
	lease  time.Duration
	renew  bool // renewed by the watchdog; false for WithLease holds

	// deadline is when the lease ends unless renewed, on the local monotonic
	// clock: the send time of the last successful acquisition or renewal plus
	// the lease. Redis cannot have expired the key before it.
	deadline time.Time
	// releasing counts the releases of the hold in flight (goroutines
	// sharing a reentrant handle may unlock at once). While one of them may
	// end the hold (see finalPending), renew no more, ignore renew replies,
	// and leave the deadline to its reply.
	releasing int
	// count is the number of holds its handle took on it, when the handle
	// counts them (a reentrant handle; 0 otherwise): releases in flight fewer
	// than count leave it held whatever their outcome.
	count    int
	renewing bool // in a renewal batch being sent: remove waits for it
	done     bool // released or lost: no longer tracked
	lost     chan struct{}
	// onLost, when set, runs once when the hold is lost, with the
	// watchdog's mutex held: it must not call into the watchdog, nor take a
	// lock held by anyone who does.
	onLost func()
	// notify holds the functions afterLost registered (see lossCallbacks).
	notify lossCallbacks
}

// lostChan returns the channel closed when the hold is lost; nil for no hold.
func (h *hold) lostChan() <-chan struct{} {
	if h == nil {
		return nil
	}
	return h.lost
}

// finalPending reports whether a release in flight may end the hold.
func (h *hold) finalPending() bool {
	return h.releasing > 0 && (h.count == 0 || h.releasing >= h.count)
}

// isLost reports whether the hold was lost.
func (h *hold) isLost() bool {
	return h != nil && isClosed(h.lost)
}

// watchdog renews every renewable hold of a Client from one goroutine, in
// batched script calls, and closes a hold's lost channel the moment the hold
// is known to be gone: when a renewal finds it gone, or when its local
// deadline passes without a successful renewal (Redis unreachable). The
// deadlines are enforced by a single timer shared by all holds, so a renewal
// stuck on an unresponsive server cannot delay a loss.
type watchdog struct {
	c      *Client
	period time.Duration // renewal period: watchdog timeout / 3

	mu       sync.Mutex
	renewed  *sync.Cond // on mu: signalled when a renewal batch is done
	holds    map[*hold]struct{}
	expiry   *time.Timer // fires at expiryAt, the earliest deadline
	expiryAt time.Time

	done      chan struct{} // closed when run returns
	started   bool
	inRenewal atomic.Bool // run is in a renewal (or about to start one)
}

func newWatchdog(c *Client) *watchdog {
	w := &watchdog{
		c:      c,
		period: c.opts.watchdogTimeout / 3,
		holds:  make(map[*hold]struct{}),
		done:   make(chan struct{}),
	}
	w.renewed = sync.NewCond(&w.mu)
	return w
}

func (w *watchdog) start() {
	w.started = true
	go w.run()
}

// stop ends the renewals and waits for the watchdog goroutine, unless it is
// in a renewal (see run). Holds are not renewed any more, but their
// deadlines still close their lost channels.
func (w *watchdog) stop() {
	// Called once the Client's ctx is cancelled, after which run starts no
	// renewal (it sets inRenewal before it checks ctx). A renewal in flight
	// is not waited for: it ends on its own, at its bound (see run).
	if w.started && !w.inRenewal.Load() {
		<-w.done
	}
}

// run ticks the renewals and runs them, one at a time, in the Client's one
// watchdog goroutine (a tick that comes during a renewal waits for it, as a
// ticker's does). go-redis does not end a read when its ctx is cancelled,
// only at its deadline, so Close does not wait for a renewal in flight to a
// frozen server (see stop): that renewal ends on its own, at its bound, and
// renews nothing after it.
func (w *watchdog) run() {
	defer close(w.done)
	t := time.NewTimer(w.period)
	defer t.Stop()
	for {
		select {
		case <-w.c.ctx.Done():
			return
		case <-t.C:
		}
		tick := time.Now()
		w.inRenewal.Store(true)
		if w.c.ctx.Err() != nil {
			return
		}
		failed := w.renewAll()
		w.inRenewal.Store(false)
		// The next renewal is due a period after this one was sent (at
		// once if this one took longer), as a ticker's: not a period
		// after its answer, which after a renewal Redis was slow to
		// answer (a retry stuck behind a slow command) left the next one
		// well under two periods before the deadline it set
		// (TestRenewalAfterSlowRetryDueOnTime).
		//
		// A renewal that failed (BUSY, LOADING, a lost reply, a refused
		// write, too few replicas) is sent again after a quarter period,
		// not a whole one: a hold whose renewals Redis refused for a
		// period or so still has most of a period left when Redis answers
		// again, and the next tick would come at its deadline. Never
		// later than that tick (a renewal held up to its bound by a
		// frozen master has the next one due at once).
		next := time.Until(tick.Add(w.period))
		if failed {
			next = min(w.retryDelay(), next)
		}
		t.Reset(max(next, time.Millisecond))
	}
}

// retryDelay is the wait before a failed renewal is sent again.
func (w *watchdog) retryDelay() time.Duration {
	return max(w.period/4, time.Millisecond)
}

// add starts tracking a hold acquired by a request sent at sent.
func (w *watchdog) add(name, key string, kind byte, member string, lease time.Duration, renew bool, sent time.Time) *hold {
	return w.addNotify(name, key, kind, member, lease, renew, sent, nil)
}

// addNotify is add with a function run when the hold is lost (see
// hold.onLost).
func (w *watchdog) addNotify(name, key string, kind byte, member string, lease time.Duration, renew bool, sent time.Time, onLost func()) *hold {
	h := &hold{
		name: name, key: key, kind: kind, member: member,
		lease: lease, renew: renew,
		deadline: sent.Add(lease),
		lost:     make(chan struct{}),
		onLost:   onLost,
	}
	w.mu.Lock()
	w.holds[h] = struct{}{}
	if !time.Now().Before(h.deadline) {
		// The reply came after the lease ran out (a slow link, a pause):
		// the hold is lost before its holder sees it.
		w.loseLocked(h, "the acquisition's reply came after its lease ran out")
	} else {
		w.scheduleLocked(h.deadline)
	}
	w.mu.Unlock()
	return h
}

// extend records a re-entry of h whose request was sent at sent: the
// script gave the hold at least its full lease from then (it never shortens
// one), so h's deadline moves to sent + lease when that is later. Without
// it a WithLease hold re-entered near its end would be reported lost (and
// its Unlock refused) while Redis still held it.
//
// count is the number of holds the handle takes on h with this re-entry:
// a release of h in flight that was its last (see finalPending) no longer
// is, since Redis counted the re-entry before it (a release that ran first
// would have ended the hold, and the re-entry would have taken another).
// Left at its old count, h stayed unrenewed and its deadline unenforced
// until that release's reply, while its new holder held it.
func (w *watchdog) extend(h *hold, sent time.Time, count int) {
	if h == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if d := sent.Add(h.lease); !h.done && d.After(h.deadline) {
		h.deadline = d
	}
	w.recountLocked(h, count)
}

// deadlineOf returns h's current local deadline.
func (w *watchdog) deadlineOf(h *hold) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return h.deadline
}

// setReleasing marks a hold whose release is in flight (v) or no longer in
// flight because the release left it held (!v). A releasing hold is not
// renewed, and a renewal reply that finds it gone does not count as a loss.
func (w *watchdog) setReleasing(h *hold, v bool) {
	w.setReleasingOf(h, v, 0)
}

// setReleasingOf is setReleasing for a handle that counts its holds on h
// (a reentrant handle): count is that number, after the release when v is
// false. While the releases in flight are fewer than count, none of them
// can end the hold: it is still renewed, and its deadline still closes
// Lost when Redis does not answer.
func (w *watchdog) setReleasingOf(h *hold, v bool, count int) {
	if h == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if v {
		h.releasing++
	} else if h.releasing > 0 {
		h.releasing--
	}
	w.recountLocked(h, count)
}

// recountLocked sets the number of holds the handle has on h (see
// setReleasingOf and extend). A hold whose releases in flight can no longer
// end it is renewed again, and its deadline enforced again: expire skipped
// it while its release was final. w.mu is held.
func (w *watchdog) recountLocked(h *hold, count int) {
	h.count = count
	if !h.finalPending() && !h.done {
		w.scheduleLocked(h.deadline)
	}
}

// remove stops tracking a released hold. No renewal for it is sent after
// remove returns: if a renewal batch holding it is being sent, remove waits
// for that batch to finish, unless the hold is releasing (its release was
// sent after that batch was collected: see below). It reports whether the
// hold had been lost.
func (w *watchdog) remove(h *hold) (lost bool) {
	if h == nil {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	// A releasing hold's release was sent after the renewal in flight was
	// collected; that renewal names the hold (token, member) and cannot
	// extend what the release ended, and its reply is ignored (done): do
	// not make the release wait for it, however long Redis takes. Nor for
	// a lost hold's: the loss is decided, and the reply changes nothing (a
	// Semaphore's lost permits, a waiter's expired queue place).
	for h.renewing && h.releasing == 0 && !h.isLost() {
		w.renewed.Wait()
	}
	delete(w.holds, h)
	h.done = true
	return h.isLost()
}

// supersede ends the tracking of h because the same handle took a new hold
// (another token, or another read hold). With an Unlock of h in flight that
// may end it (see finalPending), that Unlock released h itself: h just
// ends. Otherwise h ended in Redis without its Unlock (ForceUnlock, expiry,
// failover) before the watchdog noticed: it is lost, and its Lost channel
// closes.
func (w *watchdog) supersede(h *hold) {
	if h == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	// No wait for a renewal in flight (as remove makes for a hold with no
	// release in flight): its reply cannot change the outcome, decided
	// below (without a release in flight, h is lost), and is ignored once
	// h is done; it names h (its token, its read guard), not the new hold,
	// which it cannot extend. The caller holds its handle's mutex: a
	// renewal stuck on a connection that stopped answering held the Lock,
	// which had the lock already, up to its bound past its ctx
	// (TestRelockAfterLossNotHeldByStuckRenewal,
	// TestRelockAfterForceUnlockNotHeldByStuckRenewal).
	if h.finalPending() {
		delete(w.holds, h)
		h.done = true
		return
	}
	// No release in flight, or only releases that leave holds of the
	// handle on h: those holds are lost.
	w.loseLocked(h, "the handle took a new hold: this one ended in Redis")
}

// goneWhileHeld ends the tracking of h, which a release of a reentrant
// handle found gone while count holds of the handle remain. Unless the
// other releases in flight may have ended it (see finalPending), those
// holds are lost and Lost closes. It reports whether h was lost.
func (w *watchdog) goneWhileHeld(h *hold, count int) bool {
	if h == nil {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if h.releasing > 0 {
		h.releasing--
	}
	h.count = count
	if h.finalPending() {
		delete(w.holds, h)
		h.done = true
		return h.isLost()
	}
	w.loseLocked(h, "an Unlock found the hold gone while the handle still held it")
	return true
}

// replace ends the tracking of old, a handle's hold with count holds taken
// through it, because the handle took a hold again (see supersede), and
// returns how many of those holds the new one carries over. same says that
// Redis re-entered the very hold the handle lost (the same token: the
// master still counted it while its Lost closed, e.g. after renewals too
// few replicas acknowledged): the holds taken on it and not released are
// still counted there, and the handle starts afresh with them counted on
// the new hold (see README), else the Unlock the handle takes for its last
// would leave the count in Redis, the lock held by nobody, unrenewed.
// Otherwise (a new hold) it carries none.
func (w *watchdog) replace(old *hold, count int, same bool) int {
	w.supersede(old)
	if old == nil || !same {
		return 0
	}
	return w.unreleased(old, count)
}

// unreleased returns how many of the count holds a handle took on h, which a
// release found gone (see goneWhileHeld), were lost with h and have no
// release in flight: the Unlocks that pair with them are still to come, and
// must not count against a later hold of the handle (see
// ReentrantMutex.Unlock). 0 when h was not lost (the releases in flight
// ended it).
func (w *watchdog) unreleased(h *hold, count int) int {
	if h == nil || count <= 0 {
		return 0
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !h.isLost() {
		return 0
	}
	return max(0, count-h.releasing)
}

// loseLocked ends a hold that is gone before its release, once.
func (w *watchdog) loseLocked(h *hold, why string) {
	delete(w.holds, h)
	if h.done {
		return
	}
	h.done = true
	close(h.lost)
	if h.onLost != nil {
		h.onLost()
	}
	h.notify.fire()
	w.c.opts.logger.Warn("redlatch: hold lost", "name", h.name, "key", h.key, "reason", why)
}

// scheduleLocked makes the expiry timer fire no later than t.
func (w *watchdog) scheduleLocked(t time.Time) {
	if !w.expiryAt.IsZero() && !t.Before(w.expiryAt) {
		return
	}
	w.expiryAt = t
	d := time.Until(t)
	if w.expiry == nil {
		w.expiry = time.AfterFunc(d, w.expire)
	} else {
		w.expiry.Reset(d)
	}
}

// expire loses every hold whose deadline has passed and re-arms the timer
// for the earliest deadline left.
func (w *watchdog) expire() {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now()
	var next time.Time
	for h := range w.holds {
		if h.finalPending() {
			continue // its Unlock's reply decides
		}
		if !now.Before(h.deadline) {
			w.loseLocked(h, "lease ran out before it was renewed")
		} else if next.IsZero() || h.deadline.Before(next) {
			next = h.deadline
		}
	}
	w.expiryAt = time.Time{}
	if !next.IsZero() {
		w.scheduleLocked(next)
	}
}

// renewAll renews every renewable hold: grouped into batches of at most
// renewBatch keys of one cluster slot, all batches sent in one pipeline
// (on a cluster, one per master, all at once). It reports whether a hold
// still tracked was not renewed for want of an answer or by a refusal
// (see runBatches): not gone, to be renewed again soon.
func (w *watchdog) renewAll() (failed bool) {
	w.mu.Lock()
	groups := make(map[int][]*hold)
	var earliest time.Time // the earliest deadline among the holds renewed
	for h := range w.holds {
		if !h.renew || h.finalPending() {
			continue
		}
		if earliest.IsZero() || h.deadline.Before(earliest) {
			earliest = h.deadline
		}
		h.renewing = true
		slot := 0
		if w.c.cluster != nil {
			slot = keySlot(h.key)
		}
		groups[slot] = append(groups[slot], h)
	}
	w.mu.Unlock()
	if len(groups) == 0 {
		return false
	}
	var batches [][]*hold
	for _, hs := range groups {
		for len(hs) > 0 {
			n := min(len(hs), renewBatch)
			batches = append(batches, hs[:n])
			hs = hs[n:]
		}
	}

	// A renewal sent on time has two periods before its holds' deadlines:
	// a server that answers in more than a period is slow, not gone, and
	// cutting each renewal at a period would lose every hold on it. The
	// renewal has until shortly before the earliest deadline (a quarter
	// period, for the results to be applied before it passes), and never
	// less than a period. A renewal under WithReplicaSync may wait for its
	// replicas too.
	bound := max(w.period, time.Until(earliest)-w.period/4)
	ctx, cancel := context.WithTimeout(w.c.ctx, bound+w.c.opts.replicaTimeout)
	defer cancel()
	sent := time.Now()
	// The results of each master are applied as soon as it answered: the
	// bound (never less than a period) may pass the deadline of a hold
	// that another master renewed on time.
	applied := make([]bool, len(batches)) // guarded by w.mu
	// applyHold applies r, h's result, once: h.renewing says it is not
	// applied yet (a batch renewed key by key has its holds applied key by
	// key, see renewSyncedKeyByKey). res nil is a transient error: sent
	// again soon (see run), the deadline still guards.
	applyHold := func(h *hold, res []int64, j int) {
		if !h.renewing {
			return
		}
		h.renewing = false
		if h.done || h.finalPending() {
			return
		}
		if res == nil || res[j] == -1 {
			failed = true
			return
		}
		if res[j] == 1 {
			// Never back: a re-entry sent after this renewal (see extend)
			// restarted the lease in Redis from its own send, and no
			// renewal shortens a lease there.
			if d := sent.Add(h.lease); d.After(h.deadline) {
				h.deadline = d
			}
		} else if res[j] == 0 {
			w.loseLocked(h, "renewal found the hold gone or replaced by another")
		}
	}
	apply := func(which []int, results [][]int64) {
		w.mu.Lock()
		defer w.mu.Unlock()
		defer w.renewed.Broadcast()
		for _, i := range which {
			if applied[i] {
				continue
			}
			applied[i] = true
			for j, h := range batches[i] {
				applyHold(h, results[i], j)
			}
		}
	}
	applyPart := func(batch int, at []int, res []int64) {
		w.mu.Lock()
		defer w.mu.Unlock()
		defer w.renewed.Broadcast()
		for k, j := range at {
			applyHold(batches[batch][j], res, k)
		}
	}
	results := w.runBatchesNotify(ctx, batches, apply, applyPart)
	all := make([]int, len(batches))
	for i := range all {
		all[i] = i
	}
	apply(all, results)
	w.mu.Lock()
	defer w.mu.Unlock()
	return failed
}

// runBatches sends one renewal script call per batch, pipelined, and returns
// the per-key results of each batch (1 renewed, 0 gone, -1 renewed but not
// replicated, see runBatchesSynced, or not renewed because Redis refused
// the write, see lua/renew.lua), or nil for a batch that failed.
func (w *watchdog) runBatches(ctx context.Context, batches [][]*hold) [][]int64 {
	return w.runBatchesNotify(ctx, batches, nil, nil)
}

// runBatchesNotify is runBatches that, where the batches go to each master
// on its own (a cluster, or WithReplicaSync), also calls done (when not nil)
// with the indices of the batches of each master as soon as that master's
// results are in out; and partDone (when not nil) with the results of
// each key of a batch renewed key by key under WithReplicaSync (see
// renewSyncedKeyByKey) as soon as they are in.
func (w *watchdog) runBatchesNotify(ctx context.Context, batches [][]*hold, done func(which []int, out [][]int64), partDone func(batch int, at []int, res []int64)) [][]int64 {
	if w.c.opts.replicas > 0 {
		return w.runBatchesSyncedNotify(ctx, batches, done, partDone)
	}
	out := make([][]int64, len(batches))
	if len(batches) == 1 {
		keys, argv := renewArgs(batches[0])
		// On a cluster, a batch refused with TRYAGAIN is sent again one
		// key at a time at once (see renewKeyByKey), not again whole by
		// tryAgainHook until the migration ends.
		res, err := renewScript.Run(context.WithValue(ctx, noTryAgain{}, true), w.c.rdb, keys, argv...).Int64Slice()
		if err != nil {
			if isTryAgain(err) && len(batches[0]) > 1 {
				w.renewKeyByKey(ctx, batches, []int{0}, out)
				return out
			}
			w.c.opts.logger.Warn("redlatch: renewal failed", "error", err)
			return out
		}
		out[0] = res
		return out
	}
	if w.c.cluster != nil {
		w.runBatchesPerMaster(ctx, batches, out, done)
		return out
	}
	w.runPipelined(ctx, w.c.rdb, batches, out)
	return out
}

// runPipelined sends batches in one pipeline and writes the per-key results
// of each batch to out (nil for a batch that failed). After NOSCRIPT it
// loads the script with loader (the node the batches go to) and sends the
// refused batches again; those still refused ran on another node, and get
// the script itself.
func (w *watchdog) runPipelined(ctx context.Context, loader redis.Scripter, batches [][]*hold, out [][]int64) {
	cmds := make([]*redis.Cmd, len(batches))
	all := make([]int, len(batches))
	for i := range all {
		all[i] = i
	}
	w.sendBatches(ctx, renewScript.EvalSha, batches, all, cmds)
	// An emptied script cache (restart, SCRIPT FLUSH): load the script once
	// and send the failed batches again, still pipelined.
	if again := noScript(cmds); len(again) > 0 && renewScript.Load(ctx, loader).Err() == nil {
		w.sendBatches(ctx, renewScript.EvalSha, batches, again, cmds)
	}
	// Batches still refused so ran on a node other than loader: while a
	// slot migrates, go-redis follows the old master's -ASK to the
	// importing one, which may not have the script (a node new to the
	// cluster). The script itself, for those batches only (as
	// renewKeyByKey sends it).
	if again := noScript(cmds); len(again) > 0 {
		w.sendBatches(ctx, renewScript.Eval, batches, again, cmds)
	}
	var split []int
	for i, cmd := range cmds {
		res, err := cmd.Int64Slice()
		if err != nil {
			if isTryAgain(err) && len(batches[i]) > 1 {
				split = append(split, i)
				continue
			}
			w.c.opts.logger.Warn("redlatch: renewal failed", "error", err)
			continue
		}
		out[i] = res
	}
	if len(split) > 0 {
		w.renewKeyByKey(ctx, batches, split, out)
	}
}

// sendBatches sends batches[i], for each i in which, in one pipeline with
// send (renewScript.EvalSha or renewScript.Eval), and puts their commands in
// cmds[i].
func (w *watchdog) sendBatches(ctx context.Context, send func(context.Context, redis.Scripter, []string, ...any) *redis.Cmd, batches [][]*hold, which []int, cmds []*redis.Cmd) {
	pipe := w.c.rdb.Pipeline()
	for _, i := range which {
		keys, argv := renewArgs(batches[i])
		cmds[i] = send(ctx, pipe, keys, argv...)
	}
	_, _ = pipe.Exec(ctx)
}

// noScript returns the indices of the cmds refused with NOSCRIPT.
func noScript(cmds []*redis.Cmd) []int {
	var at []int
	for i, cmd := range cmds {
		if isNoScript(cmd.Err()) {
			at = append(at, i)
		}
	}
	return at
}

// renewKeyByKey renews batches[i] for each i in which one key at a time,
// pipelined, and writes their results to out[i]. While a slot migrates
// with keys of it on both sides, Redis refuses with TRYAGAIN a script that
// names several of them, but serves each key alone (the source runs it, or
// answers ASK for a key that moved): a batch refused so must not leave its
// holds unrenewed for as long as the migration lasts. A key whose renewal
// fails counts as not renewed (-1), not as gone. Under WithReplicaSync,
// renewSyncedKeyByKey does it.
func (w *watchdog) renewKeyByKey(ctx context.Context, batches [][]*hold, which []int, out [][]int64) {
	parts := splitByKey(batches, which)
	cmds := make([]*redis.Cmd, len(parts))
	send := func(k int, pipe redis.Pipeliner, sha bool) {
		keys, argv := parts[k].args(batches)
		if sha {
			cmds[k] = renewScript.EvalSha(ctx, pipe, keys, argv...)
		} else {
			cmds[k] = renewScript.Eval(ctx, pipe, keys, argv...)
		}
	}
	pipe := w.c.rdb.Pipeline()
	for k := range parts {
		send(k, pipe, true)
	}
	_, _ = pipe.Exec(ctx)
	// A node without the script (the one a key moved to, say): the script
	// itself, for those parts only.
	if again := noScript(cmds); len(again) > 0 {
		pipe := w.c.rdb.Pipeline()
		for _, k := range again {
			send(k, pipe, false)
		}
		_, _ = pipe.Exec(ctx)
	}
	for _, i := range which {
		out[i] = make([]int64, len(batches[i]))
	}
	for k, p := range parts {
		res, err := cmds[k].Int64Slice()
		if err != nil || len(res) != len(p.at) {
			w.c.opts.logger.Warn("redlatch: renewal failed", "error", err)
			res = nil
		}
		p.set(out, res)
	}
}

// keyPart is the holds of one key in a batch that is renewed one key at a
// time (see renewKeyByKey).
type keyPart struct {
	batch int   // the batch's index
	at    []int // the holds' positions in their batch
}

// splitByKey splits batches[i], for each i in which, into one part per
// key.
func splitByKey(batches [][]*hold, which []int) []*keyPart {
	var parts []*keyPart
	for _, i := range which {
		byKey := make(map[string]*keyPart)
		for j, h := range batches[i] {
			p := byKey[h.key]
			if p == nil {
				p = &keyPart{batch: i}
				byKey[h.key] = p
				parts = append(parts, p)
			}
			p.at = append(p.at, j)
		}
	}
	return parts
}

// args returns the KEYS and ARGV of lua/renew.lua for the part's holds.
func (p *keyPart) args(batches [][]*hold) ([]string, []any) {
	sub := make([]*hold, len(p.at))
	for k, j := range p.at {
		sub[k] = batches[p.batch][j]
	}
	return renewArgs(sub)
}

// set writes the part's results res to out[p.batch], which must be
// allocated; res nil (a renewal that failed) writes -1, not renewed, for
// each of its holds. Parts write distinct entries: they may set them
// concurrently.
func (p *keyPart) set(out [][]int64, res []int64) {
	for k, j := range p.at {
		if res == nil {
			out[p.batch][j] = -1
		} else {
			out[p.batch][j] = res[k]
		}
	}
}

// runBatchesPerMaster is runBatches on a cluster: one pipeline per master,
// all at once. Not one pipeline for all: while any master does not answer,
// go-redis retries a cluster pipeline until ctx ends and then stamps ctx's
// error on every command of it, the replies of the masters that answered
// too, so one frozen master would leave the holds on all the others
// unrenewed. For the same reason the script is loaded on the master that
// refused it only: a cluster-wide SCRIPT LOAD fails while any node is down.
func (w *watchdog) runBatchesPerMaster(ctx context.Context, batches [][]*hold, out [][]int64, done func(which []int, out [][]int64)) {
	groups := make(map[redis.Scripter][]int)
	for i, b := range batches {
		var loader redis.Scripter = w.c.rdb // master unknown: load everywhere
		if node, err := w.c.masterFor(ctx, b[0].key); err == nil {
			loader = node
		}
		groups[loader] = append(groups[loader], i)
	}
	var wg sync.WaitGroup
	for loader, which := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sub := make([][]*hold, len(which))
			for k, i := range which {
				sub[k] = batches[i]
			}
			res := make([][]int64, len(which))
			w.runPipelined(ctx, loader, sub, res)
			for k, i := range which {
				out[i] = res[k] // each goroutine writes its own entries
			}
			if done != nil {
				done(which, out) // reads only its own entries
			}
		}()
	}
	wg.Wait()
}

// renewArgs returns the KEYS and ARGV of lua/renew.lua for a batch.
func renewArgs(b []*hold) ([]string, []any) {
	keys := make([]string, len(b))
	argv := make([]any, 0, 3*len(b))
	for i, h := range b {
		keys[i] = h.key
		argv = append(argv, string(h.kind), h.member, h.lease.Milliseconds())
	}
	return keys, argv
}

// isNoScript reports whether err says the script is not in the server's
// script cache (after SCRIPT FLUSH or a restart).
func isNoScript(err error) bool {
	if err == nil {
		return false
	}
	var re redis.Error
	return errors.As(err, &re) && strings.HasPrefix(err.Error(), "NOSCRIPT")
}

// keySlot returns the Redis Cluster slot of key: CRC16 (XMODEM) of its hash
// tag, or of the whole key when it has none, modulo 16384.
func keySlot(key string) int {
	if s := strings.IndexByte(key, '{'); s >= 0 {
		if e := strings.IndexByte(key[s+1:], '}'); e > 0 {
			key = key[s+1 : s+1+e]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for b := 0; b < 8; b++ {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) % 16384
}

// lossCallbacks are the functions to run when a hold is lost (see
// lossNotifier), guarded by the mutex under which the hold's lost channel
// is closed: the watchdog's for a hold, the redlockHold's for a Redlock.
// Each runs in a goroutine of its own: they cancel contexts, which may run
// code that must not find that mutex held.
type lossCallbacks []*func()

// add runs f once lost closes, at once when it is closed already, and
// returns a function that unregisters f. mu is the mutex guarding c, under
// which lost is closed (and c fired).
func (c *lossCallbacks) add(mu sync.Locker, lost <-chan struct{}, f func()) (stop func()) {
	mu.Lock()
	if isClosed(lost) {
		mu.Unlock()
		f()
		return func() {}
	}
	p := &f
	*c = append(*c, p)
	mu.Unlock()
	return func() {
		mu.Lock()
		defer mu.Unlock()
		*c = slices.DeleteFunc(*c, func(q *func()) bool { return q == p })
	}
}

// fire starts every function registered; called with the mutex held, once
// lost is closed.
func (c *lossCallbacks) fire() {
	for _, f := range *c {
		go (*f)()
	}
	*c = nil
}

// lossNotifier is implemented by redlatch's lock types, so that Do needs
// no goroutine to watch a hold: afterLost runs f once the hold whose Lost
// channel is lost ends (at once when it has ended already) and returns a
// function that unregisters f. It reports false, and registers nothing,
// when lost belongs to no hold it knows: a user type embedding a lock
// (and overriding Lost) promotes afterLost too, and Do must then watch the
// channel itself.
type lossNotifier interface {
	afterLost(lost <-chan struct{}, f func()) (stop func(), ok bool)
}

// notifyLoss is the part of afterLost every lock type shares: current is
// the Lost channel of the handle's current hold (nil when none), and
// register adds f to that hold's callbacks. When lost is not current, it
// may be the channel of a hold since replaced (f runs at once if that one
// was lost), or of something else entirely (ok is false).
func notifyLoss(lost, current <-chan struct{}, f func(), register func() func()) (stop func(), ok bool) {
	switch {
	case lost == nil:
		return func() {}, true // no hold: never lost
	case lost == current:
		return register(), true
	case isClosed(lost):
		f()
		return func() {}, true
	}
	return nil, false
}

// holdAfterLost is afterLost for a handle whose current hold is h.
func holdAfterLost(w *watchdog, h *hold, lost <-chan struct{}, f func()) (stop func(), ok bool) {
	return notifyLoss(lost, h.lostChan(), f, func() func() { return h.notify.add(&w.mu, h.lost, f) })
}

// Locker is a lock whose hold can be lost: every lock type of redlatch
// (Mutex, ReentrantMutex, and the writer side of RWMutex among them).
type Locker interface {
	Lock(ctx context.Context) error
	Unlock(ctx context.Context) error
	Lost() <-chan struct{}
}

// Do takes l, runs fn under it, and unlocks it. The context fn receives is
// cancelled, with cause ErrLost, the moment the hold is lost (see
// Mutex.Lost), so that long work stops instead of running on unprotected.
// Do returns Lock's error, or fn's error, joined with ErrLost when the hold
// was lost (Lost closed, or Unlock found it gone: ErrNotHeld), or Unlock's
// error. Unlock uses a fresh context bounded to a few
// seconds when ctx has ended, so a cancelled job still releases its lock.
// For redlatch's lock types no goroutine watches the hold while fn runs:
// the watchdog (or Redlock's quorum check) starts one at the loss to cancel
// the context, so it ends just after Lost closes. Another Locker, including
// a type that embeds a redlatch lock and overrides Lost, costs a goroutine
// that watches its Lost channel while fn runs.
func Do(ctx context.Context, l Locker, fn func(ctx context.Context) error) (err error) {
	if ctx == nil {
		return ctxArg(ctx)
	}
	if l == nil || fn == nil {
		return invalidArg("locker and function", "must not be nil")
	}
	if err := l.Lock(ctx); err != nil {
		return err
	}
	lost := l.Lost()
	fctx, cancel := context.WithCancelCause(ctx)
	var unwatch func()
	watched := false
	if n, ok := l.(lossNotifier); ok {
		unwatch, watched = n.afterLost(lost, func() { cancel(ErrLost) })
	}
	if !watched {
		// Another Locker: a goroutine watches its Lost channel.
		watching := make(chan struct{})
		go func() {
			defer close(watching)
			select {
			case <-lost:
				cancel(ErrLost)
			case <-fctx.Done():
			}
		}()
		unwatch = func() { cancel(nil); <-watching }
	}
	defer func() {
		unwatch()
		cancel(nil)
		uctx := ctx
		if ctx.Err() != nil {
			var c context.CancelFunc
			uctx, c = cleanupContext(ctx)
			defer c()
		}
		uerr := l.Unlock(uctx)
		switch {
		case isClosed(lost), errors.Is(uerr, ErrNotHeld):
			// Lost closed, or Unlock found the hold gone before the
			// watchdog did (ForceUnlock, expiry, another handle of the
			// owner id released it): either way fn ran, at least in
			// part, without the lock.
			err = errors.Join(err, ErrLost)
		case err == nil:
			err = uerr
		}
	}()
	return fn(fctx)
}

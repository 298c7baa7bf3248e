package redlatch

import (
	"context"
	_ "embed"
	"errors"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

var (
	//go:embed lua/sem_prelude.lua
	semPreludeLua string
	//go:embed lua/sem_acquire.lua
	semAcquireLua string
	//go:embed lua/sem_release.lua
	semReleaseLua string
	//go:embed lua/sem_available.lua
	semAvailableLua string

	semAcquireScript   = newScript(fenceAcquireLua + semPreludeLua + semAcquireLua)
	semReleaseScript   = newScript(fenceReleaseLua + semPreludeLua + semReleaseLua)
	semAvailableScript = newScript(semPreludeLua + semAvailableLua)
)

// semReleaseMemory is how long a permit set remembers a Release, so that a
// retry of it (after a lost reply) is recognised. It is longer than go-redis
// retries a command and Release then sends it once more: with go-redis's
// defaults (MaxRetries 3, ReadTimeout 3s, backoff up to 512ms) the last
// go-redis copy leaves up to about 10.5s after the first, and Release's own
// resend up to about 14s after it (10s, as it was, reported ErrNotHeld for
// returned permits: TestSemaphoreReleaseResentAfterMemory). A minute, as a
// CountDownLatch remembers its calls.
const semReleaseMemory = time.Minute

// semMaxSize is the largest size of a semaphore. The scripts count permits
// in Lua numbers and keep the count in a sorted-set score, doubles, exact
// for integers up to 2^53: below it, the permits in use plus a request
// compare with the size exactly (a sum above 2^53 exceeds any such size
// even rounded). From 2^53 on, the sum could round down to the size and let
// a holder in beside one holding every permit.
const semMaxSize = 1<<53 - 1

// Semaphore is a distributed counting semaphore whose permits are leased.
//
// At most size permits are held at once, over every handle of every process
// using the name. Each successful Acquire or TryAcquire is one permit record
// in Redis with a lease: the Client's watchdog renews the records of live
// handles (in the same batched calls that renew locks), and a crashed
// holder's permits come back when its lease runs out (the watchdog timeout,
// or the fixed lease of WithLease). Expired records are reclaimed by the
// next script touching the semaphore, on the Redis server's clock.
//
// The size is given by each handle, like semaphore.NewWeighted: every
// acquisition checks the permits in use against its own handle's size, so a
// handle with a larger size may take permits a smaller one would not, and
// Available reports the free permits relative to the calling handle's size
// (never below 0). Give every handle of a name the same size.
//
// Permits belong to the handle that acquired them (WithOwner only names its
// records in Redis): Release returns permits this handle took. A handle may
// be shared by goroutines. There is no fairness: when permits are returned,
// every waiter retries, and any that fits may win, so a waiter for many
// permits can be overtaken by waiters for few.
//
// Waiters sleep until a pub/sub wake-up from a Release, or at most until the
// earliest live permit record would expire, whichever comes first; so a lost
// wake-up delays a waiter by at most the holders' lease (the watchdog
// timeout, or WithLease), and a reconnection of the subscriber wakes every
// waiter at once.
//
// Keys: the permit set "prefix{name}:sem", a sorted set; wake-ups on the
// channel "prefix{name}:sem:wake"; the fence key "prefix{name}:fence",
// shared with the locks of that name, holds the tombstone of an acquisition
// undone before it reached Redis (it expires).
type Semaphore struct {
	c       *Client
	name    string
	key     string
	channel string
	fence   string // tombstones of undone acquisitions (see lua/fence.lua)
	size    int64
	owner   string
	lease   time.Duration
	renew   bool
	err     error

	relMu   sync.Mutex // serializes Release: one record set change at a time
	lastRel string     // request id of the previous Release; on relMu
	mu      sync.Mutex
	recs    []*permitRecord // live acquisitions of this handle, oldest first

	// gen is the handle's current run of holding permits (see semGen);
	// guarded by lostMu, which is taken under the watchdog's mutex (by
	// permitLost) and under mu, and never held while taking either.
	lostMu sync.Mutex
	gen    *semGen
}

// semGen is one run of holding permits of a handle: from an acquisition
// while it held none to the Release of the last permits it held. Its
// records' losses close its lost channel (see Lost), never that of a later
// run: a record released while lost (its lease ran out as Release took it)
// reports its loss on its own run's channel. lost is guarded by lostMu.
type semGen struct {
	lost chan struct{}
}

// permitRecord is one acquisition held by a handle: its member in the permit
// set, its permit count and its watchdog hold.
type permitRecord struct {
	member string
	n      int64
	h      *hold
	gen    *semGen // the run of holding the record belongs to
	// taken is the channel of the run when a Release took the record
	// (set then, under lostMu): a loss of the record after that closes it,
	// not the channel a later acquisition started after a loss.
	taken chan struct{}
	// reported is set (under lostMu) once the record's loss was reported;
	// shared by a shrunk record and its kept part, which are lost together:
	// the loss of one must not close, again, a channel started after the
	// other's (a kept part's bridge hold starts lost when the shrunk
	// record's lease ran out).
	reported *bool
	// until is when Redis has ended the record on its own for sure: the
	// acquisition's reply time plus the lease (the script ran before it).
	until time.Time
}

// Semaphore returns a handle on the semaphore called name with size permits.
// It does not talk to Redis. Bad arguments (an empty name, a name starting
// with '}', a size ≤ 0 or of 2^53 or more, WithLease(0), WithOwner("")) are
// reported by the handle's methods as errors wrapping ErrInvalidArgument.
func (c *Client) Semaphore(name string, size int64, opts ...LockOption) *Semaphore {
	o := newLockOptions(name, opts)
	s := &Semaphore{c: c, name: name, size: size, owner: o.owner, err: o.err}
	switch {
	case s.err != nil:
	case size <= 0:
		s.err = invalidArg("size", "must be positive")
	case size > semMaxSize:
		s.err = invalidArg("size", "must be below 2^53")
	case c != nil && strings.HasPrefix(name, "}"):
		s.err = invalidArg("name", "must not start with '}'")
	}
	if c != nil {
		tag := c.tag(name)
		s.key, s.channel, s.fence = tag+":sem", tag+":sem:wake", tag+":fence"
		s.lease, s.renew = c.leaseFor(o)
	}
	return s
}

// check returns the error of bad input or a closed Client.
func (s *Semaphore) check(ctx context.Context) error {
	if s == nil {
		return invalidArg("semaphore", "is nil")
	}
	if err := s.c.check(); err != nil {
		return err
	}
	return firstErr(s.err, ctxArg(ctx))
}

// checkN checks a permit count argument.
func (s *Semaphore) checkN(ctx context.Context, n int64) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	if n <= 0 {
		return invalidArg("n", "must be positive")
	}
	if n > s.size {
		return invalidArg("n", "must not exceed the semaphore's size")
	}
	return nil
}

// Acquire blocks until n permits are held by this handle, or ctx is done. A
// failed wait returns an error matching both ErrNotObtained and ctx.Err();
// it holds no permit then. n must be between 1 and the size.
func (s *Semaphore) Acquire(ctx context.Context, n int64) error {
	_, err := s.acquire(ctx, n, true)
	return err
}

// TryAcquire makes one attempt to take n permits and reports whether it
// took them. It returns (false, nil) when fewer than n permits are free.
// n must be between 1 and the size, as for Acquire.
func (s *Semaphore) TryAcquire(ctx context.Context, n int64) (bool, error) {
	return s.acquire(ctx, n, false)
}

func (s *Semaphore) acquire(ctx context.Context, n int64, block bool) (bool, error) {
	if err := s.checkN(ctx, n); err != nil {
		return false, err
	}
	member := s.owner + "|" + newID() + "|" + strconv.FormatInt(n, 10)
	keys := []string{s.key, s.fence}
	lease := s.lease.Milliseconds()
	var sent time.Time
	var used int64 // permits in use in Redis after the acquisition, its own included
	undo := func(ctx context.Context) {
		// Resent as a release is (see Client.resendRelease): the same
		// request, which Redis applies once.
		req := newID()
		_, err := s.releaseRecords(ctx, req, "", []string{member}, "", "", true)
		s.c.resendRelease(ctx, err, true, func(ctx context.Context) error {
			_, err := s.releaseRecords(ctx, req, "", []string{member}, "", "", true)
			return err
		})
	}
	try := func(ctx context.Context) (bool, time.Duration, error) {
		sent = time.Now()
		cmd, acked, waitErr := s.c.runSynced(ctx, semAcquireScript, keys, member, n, s.size, lease)
		res, err := cmd.Int64Slice()
		if err != nil {
			return false, 0, err
		}
		if res[0] == 1 {
			if err := s.c.replicated(ctx, acked, waitErr, undo); err != nil {
				return false, 0, err
			}
			used = res[1]
			return true, 0, nil
		}
		return false, s.c.retryBound(res[1]), nil
	}
	ok, err := s.c.acquire(ctx, s.channel, nil, block, false, try, undo, nil)
	if !ok {
		return false, err
	}
	// The run of holding is chosen and the record added to the handle's in
	// one critical section: a Release of all the handle holds in between
	// would end the run this record joined.
	s.mu.Lock()
	s.lostMu.Lock()
	if s.gen == nil || len(s.recs) == 0 {
		// The first permits, or the first since the handle returned all
		// it held: a new run (the old channel is an earlier hold's, and
		// must not close at this one's loss, nor this one at its).
		s.gen = &semGen{lost: make(chan struct{})}
	} else if isClosed(s.gen.lost) {
		// The first since a loss: a new channel.
		s.gen.lost = make(chan struct{})
	}
	gen := s.gen
	s.lostMu.Unlock()
	now := time.Now()
	rec := &permitRecord{member: member, n: n, gen: gen, reported: new(bool), until: now.Add(s.lease)}
	rec.h = s.c.wd.addNotify(s.name, s.key, 'p', member, s.lease, s.renew, sent, func() { s.permitLost(rec) })
	// Forget the fixed-lease (WithLease) permits that ran out and that Redis
	// has ended too: Release has nothing left to return of them. Kept, they
	// piled up without bound on a handle whose permits are left to expire.
	// Their local deadline is no proof: a script that reached Redis late
	// (a pool wait, a retry) holds its permits a whole lease from then, and
	// the next Release returns them (see Release). Redis has ended them
	// by until, or already when it counts no permit in use but this
	// acquisition's, for the records whose reply came before this script was
	// sent (r.until - lease): the script of another, sent earlier but held up
	// longer, may have run after this one, and this count says nothing of
	// it. (Renewed permits lost are kept: Redis may still have them, see
	// Release.)
	recs := make([]*permitRecord, 0, len(s.recs)+1)
	for _, r := range s.recs {
		if !r.h.renew && r.h.isLost() && ((used == n && r.until.Add(-s.lease).Before(sent)) || !now.Before(r.until)) {
			s.c.wd.remove(r.h)
			continue
		}
		recs = append(recs, r)
	}
	s.recs = append(recs, rec)
	s.mu.Unlock()
	return true, nil
}

// Release returns n of the permits this handle holds and wakes the waiters.
// It returns ErrNotHeld, and returns nothing, when the handle holds fewer
// than n permits (never took them, released them already, or their lease ran
// out); it also returns ErrNotHeld when Redis no longer had some of them
// (those are gone, the others are returned). Released permits are no longer
// the handle's whatever Release returns. A call whose outcome is unknown
// (not sent, or its reply lost) is sent again with a fresh context bounded
// by a cleanup timeout, even after ctx ended, paced, until it gets a reply
// other than a busy or loading Redis's refusal: Redis applies it once.
// If Redis still cannot be reached, the permits come back when their lease
// runs out. A Release refused by a busy or loading Redis (BUSY, LOADING:
// the script did not run) returns that error, and the permits it returns
// whole are released again in the background, as Mutex.Unlock's release
// is (a permit record it shrinks stays whole, the handle's, unless that
// refusal answered go-redis's resend of a first send that ran, its reply
// lost: the record's name is read, once Redis answers, within the cleanup
// timeout). Permits the
// handle lost (see Lost) are removed from Redis on the next Release too, in
// case Redis kept them (renewals whose replies were lost): they are not
// counted as returned.
func (s *Semaphore) Release(ctx context.Context, n int64) error {
	if err := s.check(ctx); err != nil {
		return err
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	if n <= 0 {
		return invalidArg("n", "must be positive")
	}
	// n above the size is not invalid here: the handle holds fewer
	// (ErrNotHeld, below, without a call to Redis).
	s.relMu.Lock()
	defer s.relMu.Unlock()

	// Pick the records to return, newest first; the last one may be shrunk.
	s.mu.Lock()
	live := s.recs[:0:0]
	var held int64
	var gone []string // lost records: Redis may still have them (renewed, replies lost)
	for _, r := range s.recs {
		if r.h.isLost() {
			s.c.wd.remove(r.h) // without waiting for a renewal in flight (see watchdog.remove)
			gone = append(gone, r.member)
			continue
		}
		live = append(live, r)
		held += r.n
	}
	s.recs = live
	if len(gone) > 0 {
		// Best effort: a record lost locally may still take permits in
		// Redis until its lease there runs out; return them (and wake the
		// waiters) now. Its permits are not counted as released.
		defer func() { _, _ = s.releaseRecords(ctx, newID(), "", gone, "", "", false) }()
	}
	if held < n {
		s.mu.Unlock()
		return ErrNotHeld
	}
	var whole []*permitRecord
	var shrink *permitRecord
	need := n
	i := len(live)
	for need > 0 {
		i--
		r := live[i]
		if r.n <= need {
			whole = append(whole, r)
			need -= r.n
		} else {
			shrink = r
			break
		}
	}
	// The record shrunk stays among the handle's until its kept part
	// replaces it (below): the handle holds those permits throughout, and
	// Lost must not report nil meanwhile.
	upto := i
	if shrink != nil {
		upto++
	}
	s.recs = append([]*permitRecord(nil), live[:upto]...)
	s.lostMu.Lock()
	for _, r := range whole {
		r.taken = r.gen.lost
	}
	s.lostMu.Unlock()
	s.mu.Unlock()

	members := make([]string, len(whole))
	for j, r := range whole {
		members[j] = r.member
		s.c.wd.setReleasing(r.h, true)
	}
	var kept *permitRecord
	var bridge *hold
	oldShrink, newShrink := "", ""
	if shrink != nil {
		keep := shrink.n - need
		kept = &permitRecord{member: s.owner + "|" + newID() + "|" + strconv.FormatInt(keep, 10), n: keep, until: shrink.until, gen: shrink.gen, reported: shrink.reported}
		oldShrink, newShrink = shrink.member, kept.member
		// The handle keeps holding the kept permits while the Release is
		// in flight, however long it takes: the record stays renewed,
		// under whichever name it has (see renew.lua, kind 's'). Renewals
		// of its old name alone would find it gone once the script ran.
		// The old hold's renewal in flight, if any, is not waited for.
		bridge = s.c.wd.addNotify(s.name, s.key, 's', strconv.Itoa(len(oldShrink))+":"+oldShrink+newShrink,
			s.lease, s.renew, s.c.wd.deadlineOf(shrink.h).Add(-s.lease), func() { s.permitLost(kept) })
		s.c.wd.setReleasing(shrink.h, true)
		s.c.wd.remove(shrink.h)
	}
	req := newID()
	freed, err := s.releaseRecords(ctx, req, s.lastRel, members, oldShrink, newShrink, false)
	// A migrating slot's refusal past tryAgainWait, with ctx alive, is no
	// answer either: an earlier send, inside go-redis's retries (a lost
	// reply), may have run (see outcomeUnknown). Sent again as below; if
	// that gets no answer, the outcome stays unknown (not "refused").
	migrating := refusedInMigration(err)
	if err != nil && (!isReplyError(err) || migrating) {
		// Unknown outcome (not sent, or the reply lost): send the same
		// request again, which Redis applies once (it is remembered), so
		// the released permits come back now and the kept ones exist
		// under their new record.
		// A resend that failed with no reply too, or that a busy or
		// loading Redis refused (it did not run; the first send may have,
		// or not), is sent again, paced, within the cleanup timeout: the
		// handle no longer renews the records returned whole, which
		// otherwise stayed taken by nobody for their lease.
		cctx, cancel := cleanupContext(ctx)
		var f int64
		rerr := sendAgain(cctx, err, -1, func(ctx context.Context) (err error) {
			f, err = s.releaseRecords(ctx, req, s.lastRel, members, oldShrink, newShrink, false)
			return err
		})
		cancel()
		switch {
		case rerr == nil:
			freed, err = f, nil
		case migrating && !isReplyError(rerr):
			err = rerr // unknown, not the refusal
		}
	}
	if isBusyOrLoading(err) && len(members) > 0 {
		// Refused (BUSY, LOADING): the script did not run, and Redis still
		// has the records returned whole, which the handle no longer
		// renews: sent again in the background, as Unlock's release is
		// (see Client.resendRelease), or they stayed taken by nobody for
		// their whole lease. The record shrunk, if any, is not named: the
		// handle keeps it under its old name (below).
		prev := s.lastRel
		s.c.resendRelease(ctx, err, true, func(ctx context.Context) error {
			_, err := s.releaseRecords(ctx, req, prev, members, "", "", false)
			return err
		})
	}
	s.lastRel = req
	for _, r := range whole {
		s.c.wd.remove(r.h)
	}
	unknown := err != nil && (!isReplyError(err) || migrating)
	if shrink != nil {
		if unknown && (migrating || refusedUntilCtxEnded(err)) {
			// Most likely refused all along (the slot migrates past
			// tryAgainWait, or until ctx ended: a refusedErr, whose
			// resend was refused so too), maybe run (a lost reply): the
			// record's name in Redis tells, one key, which a migrating
			// slot serves (or answers with ASK, followed). Named wrong,
			// the Release of the kept permits returned nothing and left
			// them (all, or the record's) taken by nobody for their
			// lease.
			if ran, rerr := s.recordExists(ctx, newShrink); rerr == nil && !ran {
				kept.member = oldShrink
			}
		}
		if isReplyError(err) && !unknown {
			// Refused (BUSY, say): the script did not run, and the record
			// has its old name still, with all its permits. The kept ones
			// are tracked under it; the others come back with it, at the
			// Release of the kept ones or when its lease runs out.
			kept.member = oldShrink
			if isBusyOrLoading(err) && s.recordRenamed(ctx, newShrink) {
				// Unless the refusal answered go-redis's resend of a
				// first send that ran, its reply lost: the record has its
				// new name then (tracked under the old one, the kept
				// permits' Release returned ErrNotHeld and nothing, and
				// the record stayed taken by nobody for its lease:
				// TestSemPartialReleaseRunThenBusyKeptName).
				kept.member = newShrink
			}
		}
		if unknown {
			// The outcome unknown, Redis has the record under either name:
			// the bridge renews it under whichever (tracked under the new
			// name only, the first renewal found it missing if the script
			// had not run, and Lost closed with Redis holding the permits).
			kept.h = bridge
		} else {
			// The kept permits are tracked under their record from the
			// deadline renewed meanwhile. Kept permits lost during the
			// Release were reported lost then: Lost must not close again
			// for them, on the channel of a later acquisition.
			deadline := s.c.wd.deadlineOf(bridge)
			onLost := func() { s.permitLost(kept) }
			if bridge.isLost() {
				onLost = nil
			}
			kept.h = s.c.wd.addNotify(s.name, s.key, 'p', kept.member, s.lease, s.renew, deadline.Add(-s.lease), onLost)
			s.c.wd.setReleasing(bridge, true)
			s.c.wd.remove(bridge)
		}
		s.mu.Lock()
		for j, r := range s.recs {
			if r == shrink {
				s.recs[j] = kept
				break
			}
		}
		s.mu.Unlock()
	}
	if err != nil {
		return err
	}
	// What the script meant to return, counted from the member names as it
	// counts (a record kept under its old name after a refused partial
	// Release names more permits than the handle holds of it): comparing
	// freed with n took the surplus for a record found gone.
	meant := semMemberN(oldShrink) - semMemberN(newShrink)
	for _, m := range members {
		meant += semMemberN(m)
	}
	if freed < meant {
		// Permits found gone already (the data was lost, or their lease
		// ran out unannounced): some may be free, and no release said so
		// when none came back. Wake this Client's waiters.
		s.c.ps.dispatch(s.channel, wakeAll)
		return ErrNotHeld
	}
	return nil
}

// semMemberN returns the permit count a permit record's member names (its
// suffix after the last '|'), 0 for "", as sem_n in lua/sem_prelude.lua.
func semMemberN(member string) int64 {
	n, _ := strconv.ParseInt(member[strings.LastIndexByte(member, '|')+1:], 10, 64)
	return n
}

// releaseRecords runs the release script as request req (prev: the
// handle's previous release request, whose memory it replaces): it removes
// the records whole, and shrinks the record shrink (when not "") into the
// record kept, which names the permits it keeps. It returns the number of
// permits returned. With undo set it undoes an acquisition whose reply was
// lost: its record gets a tombstone even when found, so that a copy of that
// attempt still on the way takes nothing when it comes late.
func (s *Semaphore) releaseRecords(ctx context.Context, req, prev string, whole []string, shrink, kept string, undo bool) (int64, error) {
	u := ""
	if undo {
		u = "1"
	}
	args := make([]any, 0, 8+len(whole))
	args = append(args, s.c.publishCommand(ctx), req, prev, semReleaseMemory.Milliseconds(), shrink, kept,
		fenceRetention(s.lease), u)
	for _, m := range whole {
		args = append(args, m)
	}
	n, err := semReleaseScript.Run(ctx, s.c.rdb, []string{s.key, s.channel, s.fence}, args...).Int64()
	return n, convertErr(err)
}

// recordRenamed reports whether the permit record member, the name a
// partial Release refused by a busy or loading Redis gives the record it
// shrinks, is in the permit set: read once Redis answers, paced as a
// refused release is resent, within the cleanup timeout (false when it
// never does: most likely that Release was refused all along).
func (s *Semaphore) recordRenamed(ctx context.Context, member string) bool {
	cctx, cancel := cleanupContext(ctx)
	defer cancel()
	var again tryAgainBackoff
	for again.wait(cctx) {
		// (Refused, the read's MULTI ends in an EXECABORT: any error is
		// read again.)
		if ran, err := s.recordExists(cctx, member); err == nil {
			return ran
		}
	}
	return false
}

// recordExists reports whether the permit record member is in the permit
// set, read on its master with a cleanup context (ctx may have ended).
func (s *Semaphore) recordExists(ctx context.Context, member string) (bool, error) {
	ctx, cancel := cleanupContext(ctx)
	defer cancel()
	var cmd *redis.FloatCmd
	err := s.c.onMaster(ctx, func(p redis.Pipeliner) { cmd = p.ZScore(ctx, s.key, member) })
	if errors.Is(err, redis.Nil) {
		return false, nil
	}
	return err == nil && cmd.Err() == nil, err
}

// Lost returns a channel closed when permits this handle holds are lost
// before their Release: the watchdog found them gone from Redis (expired
// while Redis was unreachable, the permit set deleted, a failover), or
// their lease ran out locally before it was renewed, or a WithLease lease
// ran out. Release then reports ErrNotHeld for them. After a loss, the next
// acquisition starts a new channel. Lost returns nil (a channel that never
// closes) when the handle holds no permits.
func (s *Semaphore) Lost() <-chan struct{} {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.recs) == 0 {
		return nil
	}
	s.lostMu.Lock()
	defer s.lostMu.Unlock()
	return s.gen.lost
}

// permitLost runs when permit record r is lost, with the watchdog's mutex
// held.
func (s *Semaphore) permitLost(r *permitRecord) {
	s.lostMu.Lock()
	defer s.lostMu.Unlock()
	if *r.reported {
		return
	}
	*r.reported = true
	ch := r.gen.lost
	if r.taken != nil {
		ch = r.taken
	}
	if !isClosed(ch) {
		close(ch)
	}
}

// isClosed reports whether ch is closed.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// Available returns the number of free permits, relative to this handle's
// size, after reclaiming the expired ones.
func (s *Semaphore) Available(ctx context.Context) (int64, error) {
	if err := s.check(ctx); err != nil {
		return 0, err
	}
	used, err := semAvailableScript.Run(ctx, s.c.rdb, []string{s.key}).Int64()
	if err != nil {
		return 0, convertErr(err)
	}
	return max(s.size-used, 0), nil
}

package redlatch

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

var (
	//go:embed lua/latch_common.lua
	latchCommonLua string
	//go:embed lua/latch_countdown.lua
	latchCountDownLua string
	//go:embed lua/latch_set.lua
	latchSetLua string
	//go:embed lua/latch_delete.lua
	latchDeleteLua string

	latchCountDownScript = newScript(latchCommonLua + latchCountDownLua)
	latchSetScript       = newScript(latchCommonLua + latchSetLua)
	latchDeleteScript    = newScript(latchCommonLua + latchDeleteLua)
)

// CountDownLatch is a distributed countdown latch: TrySetCount starts a
// count, CountDown decrements it, and Wait blocks until it reaches zero.
// When it does, every waiter of every process is woken by pub/sub and the
// latch's key is deleted, so the latch can be counted again with a new
// TrySetCount.
//
// A latch that was never set, or has finished, has count 0: Wait returns at
// once. Set the count before the waiters start waiting. A woken waiter
// checks the count: one that reads it only after a new TrySetCount has
// armed the latch again waits for that new count to finish (as Redisson's
// await does), so do not re-arm a latch while the last round's waiters may
// still be on their way out.
//
// Waiters sleep until the wake-up of the final CountDown, and check the
// count again at least every watchdog period (WithWatchdogTimeout / 3, 10s
// by default) and whenever the subscriber reconnects: so a lost wake-up
// delays a waiter by at most one watchdog period.
//
// A running count has no expiry: a latch whose counters crash stays set
// until counted down or deleted (Delete). Each TrySetCount, CountDown and
// Delete carries a request id, so a call that Redis ran but whose reply was
// lost, and which go-redis retried, takes effect once and reports what it
// did, even when the latch has opened and been set again in between: the
// resend of a final CountDown does not count the next round down. A call
// whose reply never came (go-redis did not resend it, or ctx ended on the
// way) is sent once more, with a fresh context bounded by a cleanup
// timeout, as Semaphore.Release is: it reports what it did rather than an
// error after which calling again would act twice.
//
// Keys: the count "prefix{name}:latch", a string deleted when the count
// reaches zero, and the request ids of the calls of the last minute (also
// those that found the latch open, so that their resends stay no-ops)
// "prefix{name}:latch:done", a sorted set that expires a minute after its
// last call; wake-ups on the channel
// "prefix{name}:latch:wake".
type CountDownLatch struct {
	c       *Client
	key     string
	done    string // request ids of the last minute's calls
	channel string
	err     error
}

// CountDownLatch returns a handle on the latch called name. It does not
// talk to Redis. An empty name, or one starting with '}', is reported by
// the handle's methods as an error wrapping ErrInvalidArgument.
func (c *Client) CountDownLatch(name string) *CountDownLatch {
	l := &CountDownLatch{c: c}
	switch {
	case name == "":
		l.err = invalidArg("name", "is empty")
	case c != nil && strings.HasPrefix(name, "}"):
		l.err = invalidArg("name", "must not start with '}'")
	}
	if c != nil {
		tag := c.tag(name)
		l.key, l.done, l.channel = tag+":latch", tag+":latch:done", tag+":latch:wake"
	}
	return l
}

// check returns the error of bad input or a closed Client.
func (l *CountDownLatch) check(ctx context.Context) error {
	if l == nil {
		return invalidArg("latch", "is nil")
	}
	if err := l.c.check(); err != nil {
		return err
	}
	return firstErr(l.err, ctxArg(ctx))
}

// TrySetCount sets the count to n, n ≥ 1, if no count is running, and
// reports whether it did. It returns (false, nil) while the latch counts.
// A call whose reply was lost and that the Redis client retried reports
// what its first run did: true when it set the count; false when it found
// a count running, and then it sets nothing even when that count has
// finished before the resend.
func (l *CountDownLatch) TrySetCount(ctx context.Context, n int64) (bool, error) {
	if err := l.check(ctx); err != nil {
		return false, err
	}
	if n < 1 {
		return false, invalidArg("n", "must be at least 1")
	}
	set, err := l.run(ctx, false, latchSetScript, []string{l.key, l.done}, n, newID()).Int64()
	return set == 1, convertErr(err)
}

// CountDown decrements the count. The CountDown that brings it to zero
// deletes the latch and wakes every waiter. Counting down a finished or
// unset latch leaves it open (only its request id is remembered, so that
// a resend does not count a count set meanwhile down). Like
// Semaphore.Release, it is sent even when ctx has ended already (with a
// fresh context bounded by a cleanup timeout): a deferred CountDown of a
// task whose ctx ended must still count, as the count never expires.
func (l *CountDownLatch) CountDown(ctx context.Context) error {
	if err := l.check(ctx); err != nil {
		return err
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	err := l.run(ctx, true, latchCountDownScript, []string{l.key, l.channel, l.done},
		l.c.publishCommand(ctx), newID()).Err()
	return convertErr(err)
}

// Delete ends a running count at once, as if it had been counted down to
// zero: it deletes the count and wakes every waiter, which returns nil
// (unless a new TrySetCount came first: a waiter checks the count when
// woken). It reports whether a count was running. Use it to release the
// waiters of a latch whose counters crashed, or to reset a latch before a new
// TrySetCount. Like CountDown it is sent even when ctx has ended already,
// and it carries a request id: a call whose reply
// was lost and that the Redis client retried reports true again, and leaves
// a count set since then alone.
func (l *CountDownLatch) Delete(ctx context.Context) (bool, error) {
	if err := l.check(ctx); err != nil {
		return false, err
	}
	ctx, cancel := releaseContext(ctx)
	defer cancel()
	n, err := l.run(ctx, true, latchDeleteScript, []string{l.key, l.channel, l.done},
		l.c.publishCommand(ctx), newID()).Int64()
	return n == 1, convertErr(err)
}

// run runs a latch script whose args carry a request id. When the call's
// outcome is unknown (sent, but no reply came: lost, or ctx ended on the
// way), it is sent once more with a fresh context bounded by a cleanup
// timeout: Redis applies the request once (its id is remembered), and the
// caller learns what it did. Without it the caller could not tell, and
// could not safely call again: a new call is a new request (a CountDown
// counted twice, a TrySetCount reporting its own count as another's).
//
// A call refused by a transient reply (BUSY, LOADING) is sent again so too,
// paced, within that timeout: go-redis resends a call whose reply was lost,
// and the refusal of that resend says nothing of the first run.
//
// A call whose ctx ended before it was sent is not sent (its error), but
// for a release (CountDown, Delete), which is sent with a fresh context as
// above. Its caller replaced an ended ctx (releaseContext), but ctx may
// end before the send all the same: during the check of a cluster's
// versions (publishCommand), say. A deferred CountDown of a task cancelled
// then was lost, and the count never expires.
func (l *CountDownLatch) run(ctx context.Context, release bool, s *redis.Script, keys []string, args ...any) *redis.Cmd {
	if ctx.Err() != nil && !release {
		return s.Run(ctx, l.c.rdb, keys, args...) // not sent: its error
	}
	cmd := s.Run(ctx, l.c.rdb, keys, args...)
	// A migrating slot's refusal past tryAgainWait, with ctx alive, is no
	// answer either: an earlier send, inside go-redis's retries (a lost
	// reply), may have run (see outcomeUnknown).
	migrating := refusedInMigration(cmd.Err())
	if err := cmd.Err(); err == nil || errors.Is(err, redis.Nil) || isReplyError(err) && !isBusyOrLoading(err) && !migrating || refusedUntilCtxEnded(err) && !release {
		// (A call refused until ctx ended is not sent again: its resend,
		// refused too while the slot migrates, would hold the call the
		// cleanup timeout past its ctx; see refusedErr.)
		return cmd
	}
	// A transient refusal (BUSY, LOADING) is no answer either: it may be
	// go-redis's resend of a call whose first run took effect, its reply
	// lost. It is sent again, paced, until Redis answers.
	detached(ctx, func(cctx context.Context) {
		if migrating && !release {
			// Its resend, refused too while the slot migrates, ends with
			// the caller's ctx as well (an unknown outcome, ctx's error):
			// not the cleanup timeout past it.
			var cancel context.CancelFunc
			cctx, cancel = context.WithCancel(cctx)
			defer cancel()
			defer context.AfterFunc(ctx, cancel)()
		}
		ctx := cctx
		var again tryAgainBackoff
		lost := !isBusyOrLoading(cmd.Err()) // the first send's outcome is unknown
		if !lost && !again.wait(ctx) {
			return
		}
		for {
			next := s.Run(ctx, l.c.rdb, keys, args...)
			err := next.Err()
			if err == nil || isReplyError(err) && !isBusyOrLoading(err) {
				cmd = next
				return
			}
			if !isBusyOrLoading(err) {
				// No reply: this send may have run. The refusal of an
				// earlier one must not be returned (it says nothing ran:
				// a caller calling again would act twice). Sent once
				// more after a lost reply, as a first send is.
				cmd = next
				if lost {
					return
				}
				lost = true
				continue
			}
			if !again.wait(ctx) {
				return
			}
		}
	})
	return cmd
}

// Count returns the current count: 0 for a finished or unset latch. It
// reads the count on the master, which the scripts write (see
// Client.onMaster): a lagging replica would report a count just set as 0,
// and the old count to a waiter woken by the final CountDown.
func (l *CountDownLatch) Count(ctx context.Context) (int64, error) {
	if err := l.check(ctx); err != nil {
		return 0, err
	}
	var get *redis.StringCmd
	if err := l.c.onMaster(ctx, func(p redis.Pipeliner) { get = p.Get(ctx, l.key) }); err != nil {
		return 0, convertErr(err)
	}
	s := get.Val()
	n, err := strconv.ParseInt(s, 10, 64)
	if err == nil && (strconv.FormatInt(n, 10) != s || n < 1) {
		// "007", "+5": not a count the scripts read (DECR refuses it); "0",
		// "-3": no count redlatch writes (see is_count in latch_common.lua).
		err = strconv.ErrSyntax
	}
	if err != nil {
		return 0, fmt.Errorf("%w: latch count %q", ErrWrongType, s)
	}
	return n, nil
}

// Wait blocks until the count is zero, or ctx is done. A failed wait
// returns an error matching both ErrNotObtained and ctx.Err().
func (l *CountDownLatch) Wait(ctx context.Context) error {
	if err := l.check(ctx); err != nil {
		return err
	}
	period := l.c.opts.watchdogTimeout / 3
	try := func(ctx context.Context) (bool, time.Duration, error) {
		n, err := l.Count(ctx)
		if err != nil {
			return false, 0, err
		}
		return n == 0, period, nil
	}
	_, err := l.c.acquire(ctx, l.channel, nil, true, false, try, nil, nil)
	return err
}

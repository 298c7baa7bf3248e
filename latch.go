package redlatch

import (
	"context"
	_ "embed"
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
	set, err := l.c.runOnce(ctx, false, latchSetScript, []string{l.key, l.done}, n, newID()).Int64()
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
	err := l.c.runOnce(ctx, true, latchCountDownScript, []string{l.key, l.channel, l.done},
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
	n, err := l.c.runOnce(ctx, true, latchDeleteScript, []string{l.key, l.channel, l.done},
		l.c.publishCommand(ctx), newID()).Int64()
	return n == 1, convertErr(err)
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

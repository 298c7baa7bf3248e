package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/bsm/redislock"
	"github.com/go-redsync/redsync/v4"
	redsyncgoredis "github.com/go-redsync/redsync/v4/redis/goredis/v9"
	"github.com/redis/go-redis/v9"
	"github.com/redis/rueidis"
	"github.com/redis/rueidis/rueidislock"

	"github.com/redlatch/redlatch"
)

// locker is one lock handle: one owner of one key.
//
// Lock blocks until the lock is held or ctx is done; it returns ctx.Err()
// (possibly wrapped) in the latter case. Adapters of libraries that give up
// on their own (a retry count, a cap derived from the TTL) retry until ctx is
// done, so that every library waits the same way: until acquisition. The
// ctx given to Lock must stay live until Unlock returns: rueidislock's hold
// ends with it (WithContext derives the lock's context from it).
type locker interface {
	Lock(ctx context.Context) error
	Unlock(ctx context.Context) error
}

// proc is one client process of a library: its own connections and, where
// the library has one, its own client object, shared by the goroutines that
// run on it. Every request it sends adds one to the counter given to open.
type proc struct {
	newLock func(key string) locker // a new handle (a new owner) on key
	close   func()
}

// library is one lock implementation under test: a small adapter.
type library struct {
	name  string
	floor bool // the raw floor, the reference of W1's ratio
	open  func(addr string, reqs *atomic.Int64) (*proc, error)
}

// lease is the lock validity used by the libraries that take one.
const lease = 30 * time.Second

// libraries is the table of adapters, in the order of the output.
func libraries() []library {
	return []library{
		{name: "redlatch Mutex", open: openRedlatch(func(c *redlatch.Client, key string) locker { return c.Mutex(key) })},
		{name: "redlatch ReentrantMutex", open: openRedlatch(func(c *redlatch.Client, key string) locker { return c.ReentrantMutex(key) })},
		{name: "redlatch FairMutex", open: openRedlatch(func(c *redlatch.Client, key string) locker { return c.FairMutex(key) })},
		// readHeavy makes the RWMutex do nine read holds for each write
		// hold; in W3 a read hold after a read hold is not a handoff.
		{name: "redlatch RWMutex (read-heavy)", open: openRedlatch(func(c *redlatch.Client, key string) locker {
			m := c.RWMutex(key)
			return readHeavy(m.RLock, m.RUnlock, m.Lock, m.Unlock)
		})},
		{name: "redsync (defaults)", open: openRedsync()},
		{name: "redsync (1ms retry)", open: openRedsync(redsync.WithRetryDelay(time.Millisecond))},
		{name: "redislock (backoff 1-64ms)", open: openRedislock},
		{name: "rueidislock (KeyMajority 1)", open: openRueidislock},
		{name: "floor (SET NX PX + CAS)", floor: true, open: openFloor},
	}
}

// newGoRedis returns a go-redis client of addr that counts its requests.
func newGoRedis(addr string, reqs *atomic.Int64) *redis.Client {
	rdb := redis.NewClient(&redis.Options{Addr: addr}) // go-redis defaults: pool of 10 per CPU
	rdb.AddHook(requestCounter{reqs})
	return rdb
}

// lockFuncs adapts a pair of functions to locker.
type lockFuncs struct {
	lock, unlock func(ctx context.Context) error
}

func (l lockFuncs) Lock(ctx context.Context) error   { return l.lock(ctx) }
func (l lockFuncs) Unlock(ctx context.Context) error { return l.unlock(ctx) }

// readHeavy makes a locker for the read-heavy workload of a reader/writer
// lock: nine of every ten Lock calls take a read hold, the tenth a write
// hold; Unlock releases whichever the last Lock took.
func readHeavy(rlock, runlock, lock, unlock func(ctx context.Context) error) locker {
	return &readHeavyLocker{rlock: rlock, runlock: runlock, lock: lock, unlock: unlock}
}

type readHeavyLocker struct {
	rlock, runlock, lock, unlock func(ctx context.Context) error
	n                            int
	write                        bool
}

func (l *readHeavyLocker) Lock(ctx context.Context) error {
	l.n++
	l.write = l.n%10 == 0
	if l.write {
		return l.lock(ctx)
	}
	return l.rlock(ctx)
}

func (l *readHeavyLocker) Unlock(ctx context.Context) error {
	if l.write {
		return l.unlock(ctx)
	}
	return l.runlock(ctx)
}

// Shared reports whether the last Lock took a shared (read) hold.
func (l *readHeavyLocker) Shared() bool { return !l.write }

// openRedlatch: one redlatch.Client per process, default options
// (watchdog-renewed holds, pub/sub wake-ups).
func openRedlatch(mk func(c *redlatch.Client, key string) locker) func(string, *atomic.Int64) (*proc, error) {
	return func(addr string, reqs *atomic.Int64) (*proc, error) {
		rdb := newGoRedis(addr, reqs)
		c := redlatch.New(rdb)
		return &proc{
			newLock: func(key string) locker { return mk(c, key) },
			close:   func() { _ = c.Close(); _ = rdb.Close() },
		}, nil
	}
}

// openRedsync: one Redsync on one pool (a single Redis, so quorum 1), a
// Mutex per handle with opts over redsync's defaults (expiry 8s, 32 tries,
// retry delay 50..250ms).
func openRedsync(opts ...redsync.Option) func(string, *atomic.Int64) (*proc, error) {
	return func(addr string, reqs *atomic.Int64) (*proc, error) {
		rdb := newGoRedis(addr, reqs)
		rs := redsync.New(redsyncgoredis.NewPool(rdb))
		return &proc{
			newLock: func(key string) locker {
				m := rs.NewMutex(key, opts...)
				return lockFuncs{
					lock: func(ctx context.Context) error {
						for {
							err := m.LockContext(ctx)
							if err == nil {
								return nil
							}
							if ctx.Err() != nil {
								return ctx.Err()
							}
							var taken *redsync.ErrTaken
							if !errors.Is(err, redsync.ErrFailed) && !errors.As(err, &taken) {
								return err
							}
							// Out of tries: call again, as a user who must
							// have the lock would.
						}
					},
					unlock: func(ctx context.Context) error {
						_, err := m.UnlockContext(ctx)
						return err
					},
				}
			},
			close: func() { _ = rdb.Close() },
		}, nil
	}
}

// openRedislock: bsm/redislock with exponential backoff from 1ms to 64ms.
func openRedislock(addr string, reqs *atomic.Int64) (*proc, error) {
	rdb := newGoRedis(addr, reqs)
	rl := redislock.New(rdb)
	return &proc{
		newLock: func(key string) locker {
			var held *redislock.Lock
			return lockFuncs{
				lock: func(ctx context.Context) error {
					for {
						// The strategy counts its attempts: a new one per Obtain.
						l, err := rl.Obtain(ctx, key, lease, &redislock.Options{
							RetryStrategy: redislock.ExponentialBackoff(time.Millisecond, 64*time.Millisecond),
						})
						if err == nil {
							held = l
							return nil
						}
						if ctx.Err() != nil {
							return ctx.Err()
						}
						if !errors.Is(err, redislock.ErrNotObtained) {
							return err
						}
					}
				},
				unlock: func(ctx context.Context) error { return held.Release(ctx) },
			}
		},
		close: func() { _ = rdb.Close() },
	}, nil
}

// openRueidislock: one rueidislock Locker (its own rueidis client, with
// client-side caching to wake waiters) per process, configured as
// rueidislock's README says for a single Redis: KeyMajority 1 (one key per
// lock) and, on Redis >= 7.0.5, NoLoopTracking (without NOLOOP each client
// is sent invalidations of its own writes: every acquisition and extension
// wakes its own holder, which runs an extra extend script, and a waiter of
// its own process, which retries in vain). Other options at their defaults.
func openRueidislock(addr string, reqs *atomic.Int64) (*proc, error) {
	noLoop, err := noLoopTracking(addr)
	if err != nil {
		return nil, err
	}
	lk, err := rueidislock.NewLocker(rueidislock.LockerOption{
		ClientOption:   rueidis.ClientOption{InitAddress: []string{addr}},
		KeyMajority:    1,
		NoLoopTracking: noLoop,
		ClientBuilder: func(o rueidis.ClientOption) (rueidis.Client, error) {
			c, err := rueidis.NewClient(o)
			if err != nil {
				return nil, err
			}
			return countingRueidis{Client: c, n: reqs}, nil
		},
	})
	if err != nil {
		return nil, err
	}
	return &proc{
		newLock: func(key string) locker {
			var release context.CancelFunc
			return lockFuncs{
				lock: func(ctx context.Context) error {
					_, cancel, err := lk.WithContext(ctx, key)
					if err != nil {
						return err
					}
					release = cancel
					return nil
				},
				unlock: func(context.Context) error { release(); return nil },
			}
		},
		close: lk.Close,
	}, nil
}

// noLoopTracking reports whether the Redis at addr supports CLIENT TRACKING
// NOLOOP as rueidislock needs it (7.0.5 and later, redis/redis#11052). It
// asks with a client of its own, before any measurement.
func noLoopTracking(addr string) (bool, error) {
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := rdb.Info(ctx, "server").Result()
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
			return versionAtLeast(v, 7, 0, 5), nil
		}
	}
	return false, nil
}

// versionAtLeast reports whether the dotted version v is at least
// major.minor.patch.
func versionAtLeast(v string, want ...int) bool {
	parts := strings.Split(v, ".")
	for i, w := range want {
		n := 0
		if i < len(parts) {
			n, _ = strconv.Atoi(parts[i])
		}
		if n != w {
			return n > w
		}
	}
	return true
}

// casDelete is the floor's release: compare-and-delete in one script, run
// with EVALSHA.
var casDelete = redis.NewScript(`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`)

// openFloor: the least a correct Redis lock does. SET NX PX, retried every
// 1ms while taken; released by an EVALSHA compare-and-delete.
func openFloor(addr string, reqs *atomic.Int64) (*proc, error) {
	rdb := newGoRedis(addr, reqs)
	return &proc{
		newLock: func(key string) locker {
			b := make([]byte, 16)
			_, _ = rand.Read(b)
			owner := hex.EncodeToString(b)
			return lockFuncs{
				lock: func(ctx context.Context) error {
					t := time.NewTimer(0)
					defer t.Stop()
					for {
						// SET NX PX (go-redis's SetNX sends EX for a lease
						// of whole seconds); a nil reply: held by another.
						err := rdb.Do(ctx, "set", key, owner, "px", lease.Milliseconds(), "nx").Err()
						if err != redis.Nil {
							return err
						}
						t.Reset(time.Millisecond)
						select {
						case <-ctx.Done():
							return ctx.Err()
						case <-t.C:
						}
					}
				},
				unlock: func(ctx context.Context) error {
					return casDelete.Run(ctx, rdb, []string{key}, owner).Err()
				},
			}
		},
		close: func() { _ = rdb.Close() },
	}, nil
}

package chaos_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/redlatch/redlatch"
)

// counter counts the commands a Redis client sends.
type counter struct{ n atomic.Int64 }

func (c *counter) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *counter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { c.n.Add(1); return next(ctx, cmd) }
}
func (c *counter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		c.n.Add(int64(len(cmds)))
		return next(ctx, cmds)
	}
}

// lockCalls is every method of a lock handle, called once.
func lockCalls(l interface {
	Lock(context.Context) error
	TryLock(context.Context) (bool, error)
	Unlock(context.Context) error
	TTL(context.Context) (time.Duration, error)
	IsLocked(context.Context) (bool, error)
	ForceUnlock(context.Context) (bool, error)
}, ctx context.Context) map[string]error {
	out := map[string]error{}
	out["Lock"] = l.Lock(ctx)
	_, out["TryLock"] = l.TryLock(ctx)
	out["Unlock"] = l.Unlock(ctx)
	_, out["TTL"] = l.TTL(ctx)
	_, out["IsLocked"] = l.IsLocked(ctx)
	_, out["ForceUnlock"] = l.ForceUnlock(ctx)
	return out
}

// Bad input over every constructor and method of every primitive: an error
// wrapping ErrInvalidArgument, no panic, no command sent to Redis.
func TestBadInput(t *testing.T) {
	s := newServer(t)
	cnt := &counter{}
	rdb := rdbOf(t, s.Addr)
	rdb.AddHook(cnt)
	c := redlatch.New(rdb)
	defer c.Close()
	var nilRdb *redis.Client
	bad := redlatch.New(nilRdb)
	defer bad.Close()
	badWD := redlatch.New(rdb, redlatch.WithWatchdogTimeout(time.Millisecond))
	defer badWD.Close()
	badRS := redlatch.New(rdb, redlatch.WithReplicaSync(-1, time.Second))
	defer badRS.Close()
	ctx := ctxT(t, 10*time.Second)
	type locker interface {
		Lock(context.Context) error
		TryLock(context.Context) (bool, error)
		Unlock(context.Context) error
		TTL(context.Context) (time.Duration, error)
		IsLocked(context.Context) (bool, error)
		ForceUnlock(context.Context) (bool, error)
	}
	cases := map[string]locker{
		"Mutex empty name":               c.Mutex(""),
		"Mutex lease 0":                  c.Mutex("x", redlatch.WithLease(0)),
		"Mutex lease negative":           c.Mutex("x", redlatch.WithLease(-time.Second)),
		"Mutex empty owner":              c.Mutex("x", redlatch.WithOwner("")),
		"Mutex name with empty hash tag": c.Mutex("}x"),
		"ReentrantMutex empty name":      c.ReentrantMutex(""),
		"ReentrantMutex lease 0":         c.ReentrantMutex("x", redlatch.WithLease(0)),
		"ReentrantMutex empty owner":     c.ReentrantMutex("x", redlatch.WithOwner("")),
		"FairMutex empty name":           c.FairMutex(""),
		"FairMutex lease 0":              c.FairMutex("x", redlatch.WithLease(0)),
		"FairMutex empty owner":          c.FairMutex("x", redlatch.WithOwner("")),
		"RWMutex empty name":             c.RWMutex(""),
		"RWMutex lease negative":         c.RWMutex("x", redlatch.WithLease(-time.Second)),
		"RWMutex empty owner":            c.RWMutex("x", redlatch.WithOwner("")),
		"nil redis client":               bad.Mutex("x"),
		"watchdog timeout 1ms":           badWD.ReentrantMutex("x"),
		"negative replicas":              badRS.Mutex("x"),
	}
	for name, l := range cases {
		for method, err := range lockCalls(l, ctx) {
			if !errors.Is(err, redlatch.ErrInvalidArgument) {
				t.Errorf("%s: %s = %v; want ErrInvalidArgument", name, method, err)
			}
		}
	}
	// The read side of an RWMutex.
	for _, rw := range []*redlatch.RWMutex{c.RWMutex(""), c.RWMutex("x", redlatch.WithLease(0))} {
		if err := rw.RLock(ctx); !errors.Is(err, redlatch.ErrInvalidArgument) {
			t.Errorf("RLock = %v; want ErrInvalidArgument", err)
		}
		if _, err := rw.TryRLock(ctx); !errors.Is(err, redlatch.ErrInvalidArgument) {
			t.Errorf("TryRLock = %v; want ErrInvalidArgument", err)
		}
		if err := rw.RUnlock(ctx); !errors.Is(err, redlatch.ErrInvalidArgument) {
			t.Errorf("RUnlock = %v; want ErrInvalidArgument", err)
		}
	}
	// Semaphores: empty name, size ≤ 0, n ≤ 0, n > size, lease ≤ 0.
	sems := map[string]struct {
		s *redlatch.Semaphore
		n int64
	}{
		"Semaphore empty name":    {c.Semaphore("", 3), 1},
		"Semaphore size 0":        {c.Semaphore("x", 0), 1},
		"Semaphore size negative": {c.Semaphore("x", -2), 1},
		"Semaphore n 0":           {c.Semaphore("x", 3), 0},
		"Semaphore n negative":    {c.Semaphore("x", 3), -1},
		"Semaphore n > size":      {c.Semaphore("x", 3), 4},
		"Semaphore lease 0":       {c.Semaphore("x", 3, redlatch.WithLease(0)), 1},
	}
	for name, sc := range sems {
		if err := sc.s.Acquire(ctx, sc.n); !errors.Is(err, redlatch.ErrInvalidArgument) {
			t.Errorf("%s: Acquire = %v; want ErrInvalidArgument", name, err)
		}
		if _, err := sc.s.TryAcquire(ctx, sc.n); !errors.Is(err, redlatch.ErrInvalidArgument) {
			t.Errorf("%s: TryAcquire = %v; want ErrInvalidArgument", name, err)
		}
		// n above the size is invalid to acquire, but a Release of it is a
		// release of more than the handle holds (API.md: ErrNotHeld).
		want := redlatch.ErrInvalidArgument
		if name == "Semaphore n > size" {
			want = redlatch.ErrNotHeld
		}
		if err := sc.s.Release(ctx, sc.n); !errors.Is(err, want) {
			t.Errorf("%s: Release = %v; want %v", name, err, want)
		}
	}
	// Latches: empty name, n < 1.
	if _, err := c.CountDownLatch("x").TrySetCount(ctx, 0); !errors.Is(err, redlatch.ErrInvalidArgument) {
		t.Errorf("TrySetCount(0) = %v; want ErrInvalidArgument", err)
	}
	if err := c.CountDownLatch("").Wait(ctx); !errors.Is(err, redlatch.ErrInvalidArgument) {
		t.Errorf("latch with an empty name: Wait = %v; want ErrInvalidArgument", err)
	}
	if err := c.CountDownLatch("").CountDown(ctx); !errors.Is(err, redlatch.ErrInvalidArgument) {
		t.Errorf("latch with an empty name: CountDown = %v; want ErrInvalidArgument", err)
	}
	// Redlock: no clients, a nil client, an empty name, a bad lease.
	for name, rl := range map[string]*redlatch.Redlock{
		"Redlock no clients":  redlatch.NewRedlock("x", nil),
		"Redlock nil client":  redlatch.NewRedlock("x", []*redlatch.Client{c, nil, c}),
		"Redlock empty name":  redlatch.NewRedlock("", []*redlatch.Client{c}),
		"Redlock lease 0":     redlatch.NewRedlock("x", []*redlatch.Client{c}, redlatch.WithLease(0)),
		"Redlock same client": redlatch.NewRedlock("x", []*redlatch.Client{c, c, c}),
	} {
		if err := rl.Lock(ctx); !errors.Is(err, redlatch.ErrInvalidArgument) {
			t.Errorf("%s: Lock = %v; want ErrInvalidArgument", name, err)
		}
		if _, err := rl.TryLock(ctx); !errors.Is(err, redlatch.ErrInvalidArgument) {
			t.Errorf("%s: TryLock = %v; want ErrInvalidArgument", name, err)
		}
	}
	if _, err := c.ReentrantMutex("").HoldCount(ctx); !errors.Is(err, redlatch.ErrInvalidArgument) {
		t.Errorf("HoldCount with an empty name = %v", err)
	}
	if err := redlatch.Do(ctx, nil, nil); !errors.Is(err, redlatch.ErrInvalidArgument) {
		t.Errorf("Do(nil, nil) = %v", err)
	}
	if n := cnt.n.Load(); n != 0 {
		t.Errorf("bad input sent %d commands to Redis", n)
	}
}

// A key of the lock's name already holding a foreign value of the wrong
// type: a clear error (ErrWrongType), no panic, no hang.
func TestForeignValueWrongType(t *testing.T) {
	s := newServer(t)
	rdb := rdbOf(t, s.Addr)
	c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(time.Second))
	defer c.Close()
	ctx := ctxT(t, 10*time.Second)
	for _, foreign := range []func(key string) error{
		func(k string) error { return rdb.Set(ctx, k, "foreign", 0).Err() },
		func(k string) error { return rdb.RPush(ctx, k, "a").Err() },
	} {
		if err := foreign("{foreign}:lock"); err != nil {
			t.Fatal(err)
		}
		for _, l := range []interface {
			TryLock(context.Context) (bool, error)
		}{c.Mutex("foreign"), c.ReentrantMutex("foreign")} {
			done := make(chan struct{})
			go func() {
				defer close(done)
				ok, err := l.TryLock(ctx)
				if ok || err == nil {
					t.Errorf("TryLock on a foreign value = %v, %v; want an error", ok, err)
				}
			}()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("TryLock on a foreign value hangs")
			}
		}
		tctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		err := c.Mutex("foreign").Lock(tctx)
		cancel()
		if err == nil {
			t.Error("Lock on a foreign value succeeded")
		}
		_, err = c.Mutex("foreign").TTL(ctx)
		_ = err // TTL of any key is well defined
		if _, err := c.ReentrantMutex("foreign").HoldCount(ctx); err != nil && !errors.Is(err, redlatch.ErrWrongType) {
			t.Errorf("HoldCount on a foreign value = %v; want nil or ErrWrongType", err)
		}
		_ = rdb.Del(ctx, "{foreign}:lock")
	}
	// A hash that looks like a lock held by "x" with a garbage count: the
	// lock is busy for others; its owner's HoldCount says ErrWrongType.
	_ = rdb.HSet(ctx, "{foreign}:lock", "o", "x", "c", "notanumber")
	if ok, err := c.Mutex("foreign").TryLock(ctx); ok || err != nil {
		t.Errorf("TryLock on a foreign hash = %v, %v; want false, nil (it looks held)", ok, err)
	}
	if _, err := c.ReentrantMutex("foreign", redlatch.WithOwner("x")).HoldCount(ctx); !errors.Is(err, redlatch.ErrWrongType) {
		t.Errorf("HoldCount on a garbage count = %v; want ErrWrongType", err)
	}
	_ = rdb.Del(ctx, "{foreign}:lock")
	// The other primitives on a foreign value of the wrong type: a clear
	// error, no panic, no hang.
	others := map[string]func() error{
		"{foreign}:fair": func() error { _, err := c.FairMutex("foreign").TryLock(ctx); return err },
		"{foreign}:rw":   func() error { _, err := c.RWMutex("foreign").TryLock(ctx); return err },
		"{foreign}:sem":  func() error { _, err := c.Semaphore("foreign", 2).TryAcquire(ctx, 1); return err },
		"{foreign}:latch": func() error {
			_, err := c.CountDownLatch("foreign").Count(ctx)
			return err
		},
	}
	for key, call := range others {
		_ = rdb.RPush(ctx, key, "a")
		done := make(chan error, 1)
		go func() { done <- call() }()
		select {
		case err := <-done:
			if !errors.Is(err, redlatch.ErrWrongType) {
				t.Errorf("%s holding a list: %v; want ErrWrongType", key, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s holding a list: hangs", key)
		}
		_ = rdb.Del(ctx, key)
	}
	// The plain string: the lock script's HMGET gets WRONGTYPE.
	_ = rdb.Set(ctx, "{foreign}:lock", "foreign", 0)
	if _, err := c.Mutex("foreign").TryLock(ctx); !errors.Is(err, redlatch.ErrWrongType) {
		t.Errorf("TryLock on a string = %v; want ErrWrongType", err)
	}
}

// A closed Client returns ErrClosed from every method, and goleak finds no
// goroutine left after Close, also after holds, waits and a subscription.
func TestClosedClientNoLeaks(t *testing.T) {
	s := newServer(t)
	ignore := goleak.IgnoreCurrent()
	rdb := redis.NewClient(&redis.Options{Addr: s.Addr})
	c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(time.Second))
	ctx := ctxT(t, 10*time.Second)
	m, r := c.Mutex("closed"), c.ReentrantMutex("closed2")
	if err := m.Lock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Lock(ctx); err != nil {
		t.Fatal(err)
	}
	waitErr := make(chan error, 1)
	go func() { waitErr <- c.Mutex("closed").Lock(ctx) }() // waits: subscribes
	time.Sleep(200 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-waitErr; !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("a wait in progress at Close = %v; want ErrClosed", err)
	}
	if err := c.Close(); !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("second Close = %v", err)
	}
	for name, err := range lockCalls(m, ctx) {
		if !errors.Is(err, redlatch.ErrClosed) {
			t.Errorf("Mutex.%s after Close = %v", name, err)
		}
	}
	for name, err := range lockCalls(r, ctx) {
		if !errors.Is(err, redlatch.ErrClosed) {
			t.Errorf("ReentrantMutex.%s after Close = %v", name, err)
		}
	}
	if _, err := r.HoldCount(ctx); !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("HoldCount after Close = %v", err)
	}
	for name, l := range map[string]interface {
		Lock(context.Context) error
		TryLock(context.Context) (bool, error)
		Unlock(context.Context) error
		TTL(context.Context) (time.Duration, error)
		IsLocked(context.Context) (bool, error)
		ForceUnlock(context.Context) (bool, error)
	}{"FairMutex": c.FairMutex("closed3"), "RWMutex": c.RWMutex("closed4")} {
		for method, err := range lockCalls(l, ctx) {
			if !errors.Is(err, redlatch.ErrClosed) {
				t.Errorf("%s.%s after Close = %v", name, method, err)
			}
		}
	}
	rw := c.RWMutex("closed4")
	if err := rw.RLock(ctx); !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("RLock after Close = %v", err)
	}
	sem := c.Semaphore("closed5", 2)
	if err := sem.Acquire(ctx, 1); !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("Semaphore.Acquire after Close = %v", err)
	}
	if _, err := sem.Available(ctx); !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("Semaphore.Available after Close = %v", err)
	}
	latch := c.CountDownLatch("closed6")
	if _, err := latch.TrySetCount(ctx, 1); !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("CountDownLatch.TrySetCount after Close = %v", err)
	}
	if err := latch.Wait(ctx); !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("CountDownLatch.Wait after Close = %v", err)
	}
	if err := redlatch.NewRedlock("closed7", []*redlatch.Client{c}).Lock(ctx); !errors.Is(err, redlatch.ErrClosed) {
		t.Errorf("Redlock.Lock after Close = %v", err)
	}
	_ = rdb.Close()
	goleak.VerifyNone(t, ignore)
	// The holds of the closed Client expire after their lease: nothing left.
	nothingLeft(t, s.Addr, time.Second+slack)
}

package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/rpc"
	"os"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
)

// Locker is what the checkers need of a lock: every redlatch lock type has
// these methods (the writer side of an RWMutex too; a reader is adapted).
type Locker interface {
	Lock(ctx context.Context) error
	Unlock(ctx context.Context) error
	Token() int64
	Lost() <-chan struct{}
}

// NewLocker returns the lock of kind on c: "mutex", "reentrant" (a
// ReentrantMutex entered twice per hold, checking that the token stays),
// "fair" (a FairMutex), "rwmutex" (an RWMutex's write side), "rwmixed" (an
// RWMutex: three read holds, then a write hold) or "semaphore" (one permit
// of a Semaphore of SemaphoreSize). The last two make shared holds (see
// Sharer).
//
// SemaphoreSize is the size of the "semaphore" kind's Semaphore.
func NewLocker(c *redlatch.Client, kind, name string, opts ...redlatch.LockOption) (Locker, error) {
	switch kind {
	case "mutex":
		return c.Mutex(name, opts...), nil
	case "reentrant":
		return &twice{m: c.ReentrantMutex(name, opts...)}, nil
	case "fair":
		return c.FairMutex(name, opts...), nil
	case "rwmutex":
		return c.RWMutex(name, opts...), nil
	case "rwmixed":
		return &rwMixed{m: c.RWMutex(name, opts...)}, nil
	case "semaphore":
		return &permit{s: c.Semaphore(name, SemaphoreSize, opts...)}, nil
	}
	return nil, fmt.Errorf("chaos: unknown lock kind %q", kind)
}

// SemaphoreSize is the size of the "semaphore" kind.
const SemaphoreSize = 2

// Sharer is a Locker whose current hold may be shared with other holders
// (a read hold, a permit): such a hold has no fencing token and does not
// touch the store; the overlap checker allows shared holds to overlap (up
// to a semaphore's size).
type Sharer interface {
	Shared() bool
}

// rwMixed takes an RWMutex's read lock three times out of four, and its
// write lock the fourth.
type rwMixed struct {
	m      *redlatch.RWMutex
	n      int
	shared bool
}

func (r *rwMixed) Lock(ctx context.Context) error {
	r.n++
	r.shared = r.n%4 != 0
	if r.shared {
		return r.m.RLock(ctx)
	}
	return r.m.Lock(ctx)
}

func (r *rwMixed) Unlock(ctx context.Context) error {
	if r.shared {
		return r.m.RUnlock(ctx)
	}
	return r.m.Unlock(ctx)
}

func (r *rwMixed) Token() int64 {
	if r.shared {
		return 0
	}
	return r.m.Token()
}

func (r *rwMixed) Lost() <-chan struct{} {
	if r.shared {
		return r.m.RLost()
	}
	return r.m.Lost()
}

func (r *rwMixed) Shared() bool { return r.shared }

// permit holds one permit of a Semaphore.
type permit struct{ s *redlatch.Semaphore }

func (p *permit) Lock(ctx context.Context) error   { return p.s.Acquire(ctx, 1) }
func (p *permit) Unlock(ctx context.Context) error { return p.s.Release(ctx, 1) }
func (p *permit) Token() int64                     { return 0 }
func (p *permit) Lost() <-chan struct{}            { return p.s.Lost() }
func (p *permit) Shared() bool                     { return true }

// twice holds a ReentrantMutex twice per hold.
type twice struct {
	m     *redlatch.ReentrantMutex
	n     int
	lease time.Duration // the hold's lease (set by RunWorker)
	// changed, when set, is a re-entry that took a new token, the first
	// hold reported lost, within the first hold's lease: its Call is before
	// the first Lock, its Rel after the re-entry returned.
	changed *Hold
}

func (t *twice) Lock(ctx context.Context) error {
	t.changed = nil
	call := Mono()
	if err := t.m.Lock(ctx); err != nil {
		return err
	}
	t.n = 1
	tok, lost := t.m.Token(), t.m.Lost()
	ok, err := t.m.TryLock(ctx)
	if ok {
		t.n = 2
		if now := t.m.Token(); now != tok {
			select {
			case <-lost:
				// The first hold was lost meanwhile (Token reads 0, or the
				// re-entry took a new hold): a loss, which Unlock reports.
				// But a hold cannot end before its lease, counted from
				// before the Lock call, but by a reset of the server (which
				// CheckViolations excuses): a new token sooner is a live
				// hold's re-entry that changed its token. (The library
				// closes the first hold's Lost when a re-entry names
				// another token, so the loss alone proves nothing.)
				if at := Mono(); now != 0 && t.lease > 0 && at-call < int64(t.lease-10*time.Millisecond) {
					t.changed = &Hold{Call: call, Rel: at, Violation: fmt.Sprintf(
						"re-entry changed the token from %d to %d %v after Lock was called, within the lease %v",
						tok, now, time.Duration(at-call), t.lease)}
				}
				return nil
			default:
			}
			_ = t.Unlock(ctx)
			return fmt.Errorf("%w: re-entry changed the token from %d to %d", ErrBroken, tok, now)
		}
	}
	_ = err // a failed re-entry (a fault) leaves one hold
	return nil
}

func (t *twice) Unlock(ctx context.Context) error {
	var first error
	for ; t.n > 0; t.n-- {
		if err := t.m.Unlock(ctx); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (t *twice) Token() int64          { return t.m.Token() }
func (t *twice) Lost() <-chan struct{} { return t.m.Lost() }

// ErrBroken marks an error of a Locker that is a violation of redlatch's
// contract (not a fault it may report): the worker reports it as a Hold
// with Violation set, which CheckViolations lists.
var ErrBroken = errors.New("chaos: contract broken")

// Env is a worker's link to the test: the fenced store and the reports.
type Env interface {
	Read(token int64) ([]string, bool, error)
	Write(token int64, set []string) (bool, error)
	Report(h Hold) error
	Notify(e Event) error
}

// Local is the Env of a worker in the test process.
type Local struct{ C *Coord }

func (l Local) Read(token int64) ([]string, bool, error) {
	set, ok := l.C.Store.Read(token)
	return set, ok, nil
}
func (l Local) Write(token int64, set []string) (bool, error) {
	return l.C.Store.Write(token, set), nil
}
func (l Local) Report(h Hold) error  { return l.C.Report(h, nil) }
func (l Local) Notify(e Event) error { return l.C.Notify(e, nil) }

// remote is the Env of a worker process: net/rpc calls to the test's Coord.
type remote struct{ c *rpc.Client }

func (r remote) Read(token int64) ([]string, bool, error) {
	var rep ReadReply
	err := r.c.Call("Coord.Read", ReadArgs{Token: token}, &rep)
	return rep.Set, rep.OK, err
}
func (r remote) Write(token int64, set []string) (bool, error) {
	var ok bool
	err := r.c.Call("Coord.Write", WriteArgs{Token: token, Set: set}, &ok)
	return ok, err
}
func (r remote) Report(h Hold) error  { return r.c.Call("Coord.Report", h, &struct{}{}) }
func (r remote) Notify(e Event) error { return r.c.Call("Coord.Notify", e, &struct{}{}) }

// WorkerConfig says what a worker does: for Duration (or until Ops holds
// were taken; failed Lock calls do not count), lock,
// read the set, sleep up to HoldMax (at least HoldMin), write the set plus a
// unique id, unlock, sleep up to GapMax.
type WorkerConfig struct {
	Name     string
	Addr     string // Redis (or a proxy)
	Lock     string
	Kind     string
	Lease    time.Duration // WithLease; 0: watchdog-renewed
	Watchdog time.Duration // WithWatchdogTimeout
	Duration time.Duration
	Ops      int // stop after this many holds; 0: no limit
	HoldMin  time.Duration
	HoldMax  time.Duration
	GapMax   time.Duration
	// LostGrace, when set, makes the worker wait up to this long at the end
	// of each critical section for Lost to close (a paused holder's
	// watchdog needs a moment after SIGCONT).
	LostGrace  time.Duration
	MaxRetries int           // go-redis MaxRetries; 0: its default
	Timeout    time.Duration // go-redis read/write timeout; 0: its default
	Coord      string        // the test's RPC address (worker processes)
}

// RunWorker runs a worker until its duration or ops are done, or ctx ends.
func RunWorker(ctx context.Context, cfg WorkerConfig, env Env) error {
	rdb := redis.NewClient(&redis.Options{
		Addr: cfg.Addr, MaxRetries: cfg.MaxRetries,
		ReadTimeout: cfg.Timeout, WriteTimeout: cfg.Timeout,
		DialTimeout: time.Second,
	})
	defer rdb.Close()
	c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(cfg.Watchdog))
	defer c.Close()
	var opts []redlatch.LockOption
	if cfg.Lease > 0 {
		opts = append(opts, redlatch.WithLease(cfg.Lease))
	}
	l, err := NewLocker(c, cfg.Kind, cfg.Lock, opts...)
	if err != nil {
		return err
	}
	lease := cfg.Lease
	if lease == 0 {
		lease = cfg.Watchdog
	}
	if tw, ok := l.(*twice); ok {
		tw.lease = lease
	}
	end := time.Now().Add(cfg.Duration)
	rnd := func(min, max time.Duration) time.Duration {
		if max <= min {
			return min
		}
		return min + rand.N(max-min)
	}
	for i := 0; time.Now().Before(end) && (cfg.Ops == 0 || i < cfg.Ops) && ctx.Err() == nil; {
		h := Hold{Worker: cfg.Name, ID: fmt.Sprintf("%s-%d", cfg.Name, i)}
		lctx, cancel := context.WithDeadline(ctx, end.Add(2*lease))
		h.Call = Mono()
		err := l.Lock(lctx)
		cancel()
		if errors.Is(err, ErrBroken) {
			b := Hold{Worker: cfg.Name, ID: h.ID + "-broken", Call: h.Call, Violation: err.Error()}
			if err := env.Report(b); err != nil {
				return err
			}
		}
		if err != nil {
			_ = env.Notify(Event{Worker: cfg.Name, Kind: "error", At: Mono(), Msg: "lock: " + err.Error()})
			sleepCtx(ctx, rnd(10*time.Millisecond, 50*time.Millisecond))
			continue
		}
		h.Acq, h.Token = Mono(), l.Token()
		if tw, ok := l.(*twice); ok && tw.changed != nil {
			b := *tw.changed
			b.Worker, b.ID = cfg.Name, h.ID+"-broken"
			if err := env.Report(b); err != nil {
				return err
			}
		}
		h.Lease = int64(lease)
		i++
		if sh, ok := l.(Sharer); ok {
			h.Shared = sh.Shared()
		}
		lost := l.Lost()
		if err := env.Notify(Event{Worker: cfg.Name, Kind: "acquired", Token: h.Token, Call: h.Call, At: h.Acq}); err != nil {
			return err
		}
		ok := false
		if !h.Shared { // shared holds may not write; they have no token to read with
			h.ReadAt = Mono()
			var set []string
			if set, ok, err = env.Read(h.Token); err != nil {
				return err
			}
			h.ReadOK, h.ReadSet = ok, set
		}
		// The hold's sleep, watching Lost: when it closes is recorded.
		sleepWatch(ctx, rnd(cfg.HoldMin, cfg.HoldMax), lost, &h.LostAt, false)
		if ok {
			if h.WroteOK, err = env.Write(h.Token, append(h.ReadSet, h.ID)); err != nil {
				return err
			}
			h.WroteAt = Mono()
		}
		if cfg.LostGrace > 0 {
			sleepWatch(ctx, cfg.LostGrace, lost, &h.LostAt, true)
		}
		select {
		case <-lost:
			h.LostSeen = true
			if h.LostAt == 0 {
				h.LostAt = Mono()
			}
		default:
		}
		h.Rel = Mono()
		uctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := l.Unlock(uctx); err != nil {
			h.UnlockErr = err.Error()
			h.Lost = errors.Is(err, redlatch.ErrNotHeld)
		}
		cancel()
		h.Lost = h.Lost || h.LostSeen
		if err := env.Report(h); err != nil {
			return err
		}
		sleepCtx(ctx, rnd(0, cfg.GapMax))
	}
	return nil
}

// sleepWatch sleeps for d, or until ctx ends, watching lost: when it
// closes and *at is 0, *at is set to Mono() then. With grace set, the sleep
// ends when lost is closed (a LostGrace waits for nothing else); else it
// goes on (the hold's sleep).
func sleepWatch(ctx context.Context, d time.Duration, lost <-chan struct{}, at *int64, grace bool) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return
		case <-ctx.Done():
			return
		case <-lost:
			if *at == 0 {
				*at = Mono()
			}
			if grace {
				return
			}
			lost = nil
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// WorkerEnv is the environment variable that turns the test binary into a
// worker process; its value is the JSON WorkerConfig.
const WorkerEnv = "REDLATCH_CHAOS_WORKER"

// WorkerMain runs a worker process when WorkerEnv is set, and exits; it
// returns at once otherwise. Call it first in TestMain.
func WorkerMain() {
	js := os.Getenv(WorkerEnv)
	if js == "" {
		return
	}
	var cfg WorkerConfig
	if err := json.Unmarshal([]byte(js), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "worker config:", err)
		os.Exit(2)
	}
	conn, err := net.Dial("tcp", cfg.Coord)
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(2)
	}
	c := rpc.NewClient(conn)
	err = RunWorker(context.Background(), cfg, remote{c})
	_ = c.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

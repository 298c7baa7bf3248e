package chaos_test

import (
	"syscall"
	"testing"
	"time"

	"github.com/redlatch/redlatch/chaos"
)

// pausedHolder pauses (SIGSTOP) or kills a worker process while it holds
// the lock, for pause, while two other worker processes contend. It checks
// that another takes over within the lease plus slack, that the paused
// holder's Lost closed and its write was rejected by fencing, and the
// checkers.
func pausedHolder(t *testing.T, kind string, lease, watchdog, pause time.Duration, kill bool) {
	s := newServer(t)
	c := chaos.NewCoord()
	l, err := chaos.Serve(c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	base := chaos.WorkerConfig{
		Addr: s.Addr, Lock: "paused", Kind: kind, Lease: lease, Watchdog: watchdog,
		Coord: l.Addr().String(), HoldMax: 20 * time.Millisecond, GapMax: 20 * time.Millisecond,
	}
	leaseOf := lease
	if leaseOf == 0 {
		leaseOf = watchdog
	}

	// The victim: one hold, long enough to be paused inside it (shorter than
	// its lease, so that without the pause it would keep the lock).
	victim := base
	victim.Name, victim.Ops, victim.Duration = "victim", 1, time.Minute
	victim.HoldMin, victim.HoldMax = leaseOf*3/4, leaseOf*3/4
	victim.LostGrace = 3 * time.Second
	pv := startProc(t, c, victim)
	acq, ok := c.WaitEvent(15*time.Second, func(e chaos.Event) bool { return e.Worker == "victim" && e.Kind == "acquired" })
	if !ok {
		t.Fatalf("victim did not acquire:\n%s", pv.Output())
	}
	sig := syscall.SIGSTOP
	if kill {
		sig = syscall.SIGKILL
	}
	if err := pv.Signal(sig); err != nil {
		t.Fatal(err)
	}
	faultAt := chaos.Mono()

	others := base
	others.Duration = scale(pause + 3*time.Second)
	var procs []*chaos.Proc
	for _, name := range []string{"w1", "w2"} {
		o := others
		o.Name = name
		procs = append(procs, startProc(t, c, o))
	}
	// Another takes over: within the victim's lease plus slack after its
	// acquisition (its last renewal was no later than the pause).
	next, ok := c.WaitEvent(leaseOf+slack+5*time.Second, func(e chaos.Event) bool { return e.Kind == "acquired" })
	if !ok {
		t.Fatal("nobody took over")
	}
	if d := time.Duration(next.At - acq.At); d > leaseOf+slack {
		t.Errorf("liveness: taken over %v after the victim acquired; bound lease %v + slack %v", d, leaseOf, slack)
	}
	// And not before the victim's lease could have ended: its acquisition
	// (or last renewal) ran after its Lock was called. 10 ms for Redis's
	// millisecond expiry.
	if d := time.Duration(next.At - acq.Call); d < leaseOf-10*time.Millisecond {
		t.Errorf("mutual exclusion: %s acquired %v after the victim called Lock, within its lease %v", next.Worker, d, leaseOf)
	}
	t.Logf("taken over %v after the victim acquired (%v after the %v)", time.Duration(next.At-acq.At), time.Duration(next.At-faultAt), sig)
	if !kill {
		time.Sleep(max(0, pause-time.Duration(chaos.Mono()-faultAt)))
		if err := pv.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		waitProc(t, pv, 20*time.Second)
	}
	for _, p := range procs {
		waitProc(t, p, others.Duration+time.Minute)
	}
	holds := checkAll(t, c)
	if !kill {
		var v *chaos.Hold
		for i := range holds {
			if holds[i].Worker == "victim" {
				v = &holds[i]
			}
		}
		switch {
		case v == nil:
			t.Error("the victim reported no hold")
		case !v.LostSeen:
			t.Errorf("the paused holder's Lost() did not close after SIGCONT: %+v", *v)
		case v.WroteOK:
			t.Errorf("the paused holder's write was accepted: %+v", *v)
		default:
			t.Logf("paused holder: token %d, Lost closed, read accepted %v, write rejected, Unlock: %q", v.Token, v.ReadOK, v.UnlockErr)
		}
	}
	nothingLeft(t, s.Addr, leaseOf+slack)
}

// A holder process paused (SIGSTOP) past its fixed lease (WithLease).
func TestHolderPausedPastLease(t *testing.T) {
	pausedHolder(t, "mutex", time.Second, time.Second, 2500*time.Millisecond, false)
}

// The same with a ReentrantMutex held twice.
func TestReentrantHolderPausedPastLease(t *testing.T) {
	pausedHolder(t, "reentrant", time.Second, time.Second, 2500*time.Millisecond, false)
}

// A watchdog-renewed holder stopped for longer than the watchdog timeout,
// as a long GC pause would: the renewals stop with it.
func TestWatchdogTimeoutShorterThanGCPause(t *testing.T) {
	pausedHolder(t, "mutex", 0, 600*time.Millisecond, 1800*time.Millisecond, false)
}

// A holder process killed (SIGKILL) while it holds: the lock frees after the
// watchdog timeout, nothing left behind.
func TestHolderKilled(t *testing.T) {
	pausedHolder(t, "mutex", 0, time.Second, 0, true)
}

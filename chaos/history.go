package chaos

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
)

// Hold is one critical section of a worker, timed on Mono.
type Hold struct {
	Worker string // the worker (one lock handle, so one owner)
	ID     string // unique id, the element it adds to the lock-set
	Shared bool   // a shared hold (a reader); exclusive when false

	Call  int64 // before Lock was called
	Acq   int64 // after Lock returned: the hold surely began before
	Rel   int64 // before Unlock was called: the hold surely lasted until
	Token int64 // Token() after Lock
	Lease int64 // the lease (ns) the acquisition set: WithLease, or the watchdog timeout

	ReadOK  bool     // the fenced read was accepted
	ReadAt  int64    // before the read was sent
	ReadSet []string // what it read
	WroteOK bool     // the fenced write (ReadSet + ID) was accepted
	WroteAt int64    // after the write's reply

	LostSeen  bool   // Lost() was closed at Rel
	LostAt    int64  // when the worker saw Lost() close (0: not by Rel); it watches it from Acq
	Lost      bool   // LostSeen, or Unlock returned ErrNotHeld
	UnlockErr string // Unlock's error, if any

	// Violation, when set, is a broken contract the worker saw itself (see
	// ErrBroken); such a record is no hold (Acq is 0).
	Violation string
}

// Acked reports whether the hold's update was acknowledged: written, and the
// hold released normally.
func (h Hold) Acked() bool { return h.WroteOK && !h.Lost && h.UnlockErr == "" }

// Event is a notice from a worker while it runs.
type Event struct {
	Worker string
	Kind   string // "acquired", "error", "violation"
	Token  int64
	Call   int64 // Mono: for "acquired", when Lock was called
	At     int64 // Mono
	Msg    string
}

// Store is the resource the lock protects: a set of ids, fenced. It keeps
// the highest token it has seen, on reads and writes, and rejects any
// operation with a lower one, so a holder whose lock was taken over can
// neither read nor write once the new holder has touched the store.
type Store struct {
	mu       sync.Mutex
	max      int64
	set      []string
	rejected int
}

// Read returns the set, or false when token is stale.
func (s *Store) Read(token int64) ([]string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if token < s.max {
		s.rejected++
		return nil, false
	}
	s.max = token
	return slices.Clone(s.set), true
}

// Write replaces the set, or reports false when token is stale.
func (s *Store) Write(token int64, set []string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if token < s.max {
		s.rejected++
		return false
	}
	s.max = token
	s.set = slices.Clone(set)
	return true
}

// Final returns the set and how many stale operations were rejected.
func (s *Store) Final() ([]string, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.set), s.rejected
}

// Coord collects the holds and events of every worker of a test, in the
// test process, and serves the Store to them. Its methods are the RPC
// service of worker processes (net/rpc) and the Env of in-process workers.
type Coord struct {
	Store  Store
	Events chan Event // buffered; events beyond its capacity are dropped

	mu    sync.Mutex
	holds []Hold
}

// NewCoord returns an empty Coord.
func NewCoord() *Coord { return &Coord{Events: make(chan Event, 1<<16)} }

// Holds returns the holds reported so far.
func (c *Coord) Holds() []Hold {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.holds)
}

// The RPC methods.

type ReadArgs struct{ Token int64 }
type ReadReply struct {
	Set []string
	OK  bool
}
type WriteArgs struct {
	Token int64
	Set   []string
}

func (c *Coord) Read(a ReadArgs, r *ReadReply) error {
	r.Set, r.OK = c.Store.Read(a.Token)
	return nil
}

func (c *Coord) Write(a WriteArgs, ok *bool) error {
	*ok = c.Store.Write(a.Token, a.Set)
	return nil
}

func (c *Coord) Report(h Hold, _ *struct{}) error {
	c.mu.Lock()
	c.holds = append(c.holds, h)
	c.mu.Unlock()
	return nil
}

func (c *Coord) Notify(e Event, _ *struct{}) error {
	select {
	case c.Events <- e:
	default:
	}
	return nil
}

// WaitEvent waits up to d for an event matching f, discarding the others.
func (c *Coord) WaitEvent(d time.Duration, f func(Event) bool) (Event, bool) {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case e := <-c.Events:
			if f(e) {
				return e, true
			}
		case <-t.C:
			return Event{}, false
		}
	}
}

// ---- Checkers. Each returns the violations it found, in words. ----

// CheckOverlap checks mutual exclusion: no two holds of different workers
// that reported no loss overlap, except two shared holds; with size > 1 (a
// semaphore), at most size such holds overlap at any instant.
//
// A hold that reported a loss is exempt only from the time it could have
// been lost: its acquisition ran in Redis at some instant of [Call, Acq], so
// when that whole window lies inside a hold of another worker that reported
// no loss (size of them, for a semaphore), Lock granted a lock that was not
// free. Without this, a Lock that returns nil without taking the lock, whose
// Unlock then returns ErrNotHeld, would pass.
func CheckOverlap(holds []Hold, size int) []string {
	hs := slices.DeleteFunc(valid(holds), func(h Hold) bool { return h.Lost })
	sort.Slice(hs, func(i, j int) bool { return hs[i].Acq < hs[j].Acq })
	var v []string
	for _, b := range valid(holds) {
		if !b.Lost {
			continue
		}
		n := 0
		for _, a := range hs {
			if a.Worker == b.Worker || a.Acq >= b.Call || a.Rel <= b.Acq || a.Shared && b.Shared && size == 1 {
				continue
			}
			if n++; n >= size {
				v = append(v, fmt.Sprintf("granted while held: %s %s (reported lost) acquired in [%.3fs..%.3fs] inside %s %s [%s]",
					b.Worker, b.ID, float64(b.Call)/1e9, float64(b.Acq)/1e9, a.Worker, a.ID, span(a)))
				break
			}
		}
	}
	if size > 1 {
		type edge struct {
			at int64
			d  int
		}
		var es []edge
		for _, h := range hs {
			es = append(es, edge{h.Acq, 1}, edge{h.Rel, -1})
		}
		sort.Slice(es, func(i, j int) bool {
			return es[i].at < es[j].at || es[i].at == es[j].at && es[i].d < es[j].d
		})
		n := 0
		for _, e := range es {
			if n += e.d; n > size {
				v = append(v, fmt.Sprintf("%d holds at %.3fs, size %d", n, float64(e.at)/1e9, size))
			}
		}
		return v
	}
	for i, a := range hs {
		for _, b := range hs[i+1:] {
			if b.Acq >= a.Rel {
				break
			}
			if b.Worker != a.Worker && !(a.Shared && b.Shared) {
				v = append(v, fmt.Sprintf("overlap: %s %s [%s] and %s %s [%s]",
					a.Worker, a.ID, span(a), b.Worker, b.ID, span(b)))
			}
		}
	}
	return v
}

// CheckLeases checks that no lock was granted while another worker's hold
// was surely still in force, even when that hold later reported a loss: a
// hold lost because its lease ran out (a pause, a cut link) excuses an
// overlap only after its lease could have run out. The acquisition of a hold
// ran in Redis no earlier than its Call, with a TTL of its Lease, and nothing
// releases it before its worker's Unlock (after Rel) but a reset of the
// server (resets: instants on Mono when the server lost its data, a restart
// without persistence). So a hold is surely in force over [Acq, end), end
// being the earliest of Rel, Call + Lease (less 10 ms for Redis's millisecond
// expiry) and the first reset after Call. A hold whose whole Lock call
// ([Call, Acq]) lies in such a span of size other holds (size 1: of any
// other hold, but a shared one beside a shared one) was granted while held.
//
// Without this, a Lock that takes a lock from its holder passes CheckOverlap:
// the robbed holder's renewal fails, it reports the loss, and the overlap is
// excused.
func CheckLeases(holds []Hold, size int, resets []int64) []string {
	hs := valid(holds)
	end := func(h Hold) int64 {
		e := h.Rel
		if h.Lost && h.Lease > 0 {
			e = min(e, h.Call+h.Lease-int64(10*time.Millisecond))
		}
		for _, r := range resets {
			if r >= h.Call && r < e {
				e = r
			}
		}
		return e
	}
	var v []string
	for _, b := range hs {
		n, lost := 0, b.Lost
		for _, a := range hs {
			if a.Worker == b.Worker || a.Acq >= b.Call || end(a) <= b.Acq || a.Shared && b.Shared && size == 1 {
				continue
			}
			lost = lost || a.Lost
			if n++; n >= size {
				if lost { // else both kept their holds: CheckOverlap reports it
					v = append(v, fmt.Sprintf("granted within another's lease: %s %s (lost %v) acquired in [%.3fs..%.3fs] while %s %s [%s] (lost %v) held until at least %.3fs",
						b.Worker, b.ID, b.Lost, float64(b.Call)/1e9, float64(b.Acq)/1e9, a.Worker, a.ID, span(a), a.Lost, float64(end(a))/1e9))
				}
				break
			}
		}
	}
	return v
}

// CheckViolations lists the broken contracts the workers reported, but
// those whose span ([Call, Rel]) holds a reset of the server (resets: see
// CheckLeases), which may have caused them.
func CheckViolations(holds []Hold, resets []int64) []string {
	var v []string
	for _, h := range holds {
		if h.Violation != "" && !slices.ContainsFunc(resets, func(r int64) bool { return r >= h.Call && r <= h.Rel }) {
			v = append(v, fmt.Sprintf("%s %s: %s", h.Worker, h.ID, h.Violation))
		}
	}
	return v
}

// CheckTokens checks that fencing tokens never go backwards: when a hold's
// Lock returned before another worker's Lock was called, the later hold has
// the greater token. Every exclusive hold has a positive token; shared holds
// (readers, permits) carry none and are skipped.
func CheckTokens(holds []Hold) []string {
	// Shared holds have no token. A hold lost before its worker read the
	// token reads 0 (Token reports no hold), and the resource refuses it.
	hs := slices.DeleteFunc(valid(holds), func(h Hold) bool { return h.Shared || (h.Token == 0 && h.Lost) })
	sort.Slice(hs, func(i, j int) bool { return hs[i].Call < hs[j].Call })
	var v []string
	for j, b := range hs {
		if b.Token <= 0 {
			v = append(v, fmt.Sprintf("token %d of %s %s", b.Token, b.Worker, b.ID))
		}
		for _, a := range hs[:j] {
			if a.Worker != b.Worker && a.Acq < b.Call && b.Token <= a.Token {
				v = append(v, fmt.Sprintf("token went backwards: %s %s got %d after %s %s got %d",
					b.Worker, b.ID, b.Token, a.Worker, a.ID, a.Token))
			}
		}
	}
	return v
}

// CheckLostUpdates is Jepsen's lock-set check: every acknowledged id is in
// the final set.
func CheckLostUpdates(holds []Hold, final []string) []string {
	in := make(map[string]bool, len(final))
	for _, id := range final {
		in[id] = true
	}
	var v []string
	for _, h := range holds {
		if h.Acked() && !in[h.ID] {
			v = append(v, fmt.Sprintf("lost update: %s %s (token %d) acknowledged, not in the final set", h.Worker, h.ID, h.Token))
		}
	}
	return v
}

// CheckLinearizable checks with porcupine that the critical sections whose
// write was accepted form a linearizable history of a set register: each read
// the set left by the previous one, in an order that respects real time.
func CheckLinearizable(holds []Hold) []string {
	var ops []porcupine.Operation
	for i, h := range holds {
		if h.ReadOK && h.WroteOK {
			ops = append(ops, porcupine.Operation{
				ClientId: i, Input: h.ID, Output: key(h.ReadSet),
				Call: h.ReadAt, Return: h.WroteAt,
			})
		}
	}
	model := porcupine.Model{
		Init: func() any { return "" },
		Step: func(state, input, output any) (bool, any) {
			if output.(string) != state.(string) {
				return false, state
			}
			return true, key(append(strings.Split(state.(string), ","), input.(string)))
		},
	}
	res, _ := porcupine.CheckOperationsVerbose(model, ops, 20*time.Second)
	switch res {
	case porcupine.Illegal:
		return []string{fmt.Sprintf("lock-set history of %d operations is not linearizable", len(ops))}
	case porcupine.Unknown:
		// Not decided in time: say so rather than pass silently.
		return []string{fmt.Sprintf("lock-set history of %d operations: porcupine did not decide within 20s", len(ops))}
	}
	return nil
}

// key is a canonical form of a set.
func key(set []string) string {
	s := slices.DeleteFunc(slices.Clone(set), func(x string) bool { return x == "" })
	slices.Sort(s)
	return strings.Join(s, ",")
}

// FirstAcquiredAfter returns the Acq of the first hold acquired after t by a
// worker other than except, or 0.
func FirstAcquiredAfter(holds []Hold, t int64, except string) int64 {
	var first int64
	for _, h := range holds {
		if h.Worker != except && h.Acq > t && (first == 0 || h.Acq < first) {
			first = h.Acq
		}
	}
	return first
}

func valid(holds []Hold) []Hold {
	return slices.DeleteFunc(slices.Clone(holds), func(h Hold) bool { return h.Acq == 0 })
}

func span(h Hold) string {
	return fmt.Sprintf("%.3fs..%.3fs token %d", float64(h.Acq)/1e9, float64(h.Rel)/1e9, h.Token)
}

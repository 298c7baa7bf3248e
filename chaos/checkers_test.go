package chaos_test

import (
	"testing"

	"github.com/redlatch/redlatch/chaos"
)

// The overlap checker itself: exclusive holds of different workers must not
// overlap, shared holds may, and a semaphore admits at most size at once;
// lost holds do not count.
func TestCheckOverlap(t *testing.T) {
	h := func(w string, acq, rel int64, shared, lost bool) chaos.Hold {
		return chaos.Hold{Worker: w, ID: w, Call: acq, Acq: acq, Rel: rel, Shared: shared, Lost: lost}
	}
	// called: a hold whose Lock was called at call.
	called := func(call int64, h chaos.Hold) chaos.Hold { h.Call = call; return h }
	cases := []struct {
		name  string
		holds []chaos.Hold
		size  int
		bad   bool
	}{
		{"exclusive in turn", []chaos.Hold{h("a", 1, 2, false, false), h("b", 2, 3, false, false)}, 1, false},
		{"exclusive overlap", []chaos.Hold{h("a", 1, 3, false, false), h("b", 2, 4, false, false)}, 1, true},
		{"overlap with a lost hold", []chaos.Hold{h("a", 1, 3, false, true), h("b", 2, 4, false, false)}, 1, false},
		{"lost hold granted inside another's hold", []chaos.Hold{h("a", 1, 5, false, false), h("b", 2, 3, false, true)}, 1, true},
		{"lost hold taken before another's, its reply late", []chaos.Hold{h("a", 2, 5, false, false), called(1, h("b", 3, 4, false, true))}, 1, false},
		{"lost reader granted inside a writer's hold", []chaos.Hold{h("a", 1, 5, false, false), h("b", 2, 3, true, true)}, 1, true},
		{"lost permit granted inside two others", []chaos.Hold{h("a", 1, 5, true, false), h("b", 1, 5, true, false), h("c", 2, 3, true, true)}, 2, true},
		{"lost permit granted beside one other", []chaos.Hold{h("a", 1, 5, true, false), h("c", 2, 3, true, true)}, 2, false},
		{"readers together", []chaos.Hold{h("a", 1, 3, true, false), h("b", 2, 4, true, false)}, 1, false},
		{"reader and writer", []chaos.Hold{h("a", 1, 3, true, false), h("b", 2, 4, false, false)}, 1, true},
		{"two permits of two", []chaos.Hold{h("a", 1, 3, true, false), h("b", 2, 4, true, false)}, 2, false},
		{"three permits of two", []chaos.Hold{h("a", 1, 5, true, false), h("b", 2, 5, true, false), h("c", 3, 4, true, false)}, 2, true},
	}
	for _, c := range cases {
		if v := chaos.CheckOverlap(c.holds, c.size); (len(v) > 0) != c.bad {
			t.Errorf("%s: violations %v, want violations: %v", c.name, v, c.bad)
		}
	}
}

// CheckLeases: a hold reported lost excuses an overlap only once its lease
// could have run out (or the server lost its data): a Lock that takes the
// lock from a live holder, whose renewal then fails, is caught.
func TestCheckLeases(t *testing.T) {
	const lease = 1000
	h := func(w string, call, acq, rel int64, shared, lost bool) chaos.Hold {
		return chaos.Hold{Worker: w, ID: w, Call: call, Acq: acq, Rel: rel, Shared: shared, Lost: lost, Lease: lease * 1e6}
	}
	ms := int64(1e6)
	cases := []struct {
		name   string
		holds  []chaos.Hold
		size   int
		resets []int64
		bad    bool
	}{
		{"stolen within the lease", []chaos.Hold{h("a", 0, 1*ms, 50*ms, false, true), h("b", 10*ms, 20*ms, 30*ms, false, false)}, 1, nil, true},
		{"taken over after the lease", []chaos.Hold{h("a", 0, 1*ms, 2000*ms, false, true), h("b", 10*ms, 1100*ms, 1200*ms, false, false)}, 1, nil, false},
		{"taken over after a reset", []chaos.Hold{h("a", 0, 1*ms, 50*ms, false, true), h("b", 10*ms, 20*ms, 30*ms, false, false)}, 1, []int64{5 * ms}, false},
		{"taken after the holder released", []chaos.Hold{h("a", 0, 1*ms, 5*ms, false, true), h("b", 4*ms, 20*ms, 30*ms, false, false)}, 1, nil, false},
		{"readers", []chaos.Hold{h("a", 0, 1*ms, 50*ms, true, true), h("b", 10*ms, 20*ms, 30*ms, true, false)}, 1, nil, false},
		{"writer inside a lost reader's lease", []chaos.Hold{h("a", 0, 1*ms, 50*ms, true, true), h("b", 10*ms, 20*ms, 30*ms, false, false)}, 1, nil, true},
		{"third permit of two", []chaos.Hold{h("a", 0, 1*ms, 50*ms, true, true), h("b", 0, 1*ms, 50*ms, true, false), h("c", 10*ms, 20*ms, 30*ms, true, false)}, 2, nil, true},
		{"second permit of two", []chaos.Hold{h("a", 0, 1*ms, 50*ms, true, true), h("c", 10*ms, 20*ms, 30*ms, true, false)}, 2, nil, false},
		{"lost hold granted inside a live one", []chaos.Hold{h("a", 0, 1*ms, 50*ms, false, false), h("b", 10*ms, 20*ms, 30*ms, false, true)}, 1, nil, true},
	}
	for _, c := range cases {
		if v := chaos.CheckLeases(c.holds, c.size, c.resets); (len(v) > 0) != c.bad {
			t.Errorf("%s: violations %v, want violations: %v", c.name, v, c.bad)
		}
	}
}

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

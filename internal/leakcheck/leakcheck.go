// Package leakcheck finds goroutines that outlive a test run.
package leakcheck

import (
	"fmt"
	"runtime"
	"strings"
	"time"
)

// ignored are stack fragments of goroutines that belong to the Go runtime
// and the testing package, not to the code under test.
var ignored = []string{
	"testing.(*M).",
	"testing.tRunner",
	"testing.runTests",
	"testing.(*T).Run",
	"runtime.goexit()\n", // placeholder never alone; kept for clarity
	"os/signal.signal_recv",
	"os/signal.loop",
	"runtime.ensureSigM",
	"internal/leakcheck.Check",
}

// Check returns an error listing the goroutines still running that are not
// the runtime's or the testing package's, after waiting up to wait for them
// to exit.
func Check(wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		leaked := interesting()
		if len(leaked) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("leakcheck: %d goroutine(s) still running:\n\n%s", len(leaked), strings.Join(leaked, "\n\n"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func interesting() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i == 0 || strings.TrimSpace(g) == "" {
			continue // the first is the current goroutine
		}
		skip := false
		for _, s := range ignored {
			if s != "runtime.goexit()\n" && strings.Contains(g, s) {
				skip = true
				break
			}
		}
		if !skip {
			out = append(out, g)
		}
	}
	return out
}

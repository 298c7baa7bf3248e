package main

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/redlatch/redlatch/internal/leakcheck"
)

// TestMain fails the run when a goroutine outlives the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	if err := leakcheck.Check(5 * time.Second); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

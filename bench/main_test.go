package main

import (
	"testing"
	"time"

	"github.com/redlatch/redlatch/internal/leakcheck"
)

// TestMain fails the run when a goroutine outlives the tests.
func TestMain(m *testing.M) {
	leakcheck.Exit(m.Run(), 5*time.Second)
}

package raftkv

import (
	"go.etcd.io/raft/v3"
	"go.uber.org/zap"
)

// raftLogger lets the Raft library log through the member's zap logger.
// Raft's Info lines (elections, term changes) are state changes an operator
// wants; its Debug lines stay at Debug.
type raftLogger struct{ s *zap.SugaredLogger }

func newRaftLogger(lg *zap.Logger) raft.Logger {
	// Skip the adapter's own frame so the caller shown is raft's.
	return raftLogger{s: lg.Named("raft").WithOptions(zap.AddCallerSkip(1)).Sugar()}
}

func (l raftLogger) Debug(v ...any)                   { l.s.Debug(v...) }
func (l raftLogger) Debugf(format string, v ...any)   { l.s.Debugf(format, v...) }
func (l raftLogger) Error(v ...any)                   { l.s.Error(v...) }
func (l raftLogger) Errorf(format string, v ...any)   { l.s.Errorf(format, v...) }
func (l raftLogger) Info(v ...any)                    { l.s.Info(v...) }
func (l raftLogger) Infof(format string, v ...any)    { l.s.Infof(format, v...) }
func (l raftLogger) Warning(v ...any)                 { l.s.Warn(v...) }
func (l raftLogger) Warningf(format string, v ...any) { l.s.Warnf(format, v...) }
func (l raftLogger) Fatal(v ...any)                   { l.s.Fatal(v...) }
func (l raftLogger) Fatalf(format string, v ...any)   { l.s.Fatalf(format, v...) }
func (l raftLogger) Panic(v ...any)                   { l.s.Panic(v...) }
func (l raftLogger) Panicf(format string, v ...any)   { l.s.Panicf(format, v...) }

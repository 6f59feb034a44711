package storage

import (
	"fmt"
	"net/http"
)

// Error codes of etcd's v2 API (etcd 3.4 v2error/error.go).
const (
	EcodeKeyNotFound        = 100
	EcodeTestFailed         = 101
	EcodeNotFile            = 102
	EcodeNotDir             = 104
	EcodeNodeExist          = 105
	EcodeRootROnly          = 107
	EcodeDirNotEmpty        = 108
	EcodeUnauthorized       = 110
	EcodePrevValueRequired  = 201
	EcodeTTLNaN             = 202
	EcodeIndexNaN           = 203
	EcodeInvalidField       = 209
	EcodeInvalidForm        = 210
	EcodeRefreshValue       = 211
	EcodeRefreshTTLRequired = 212
	EcodeRaftInternal       = 300
	EcodeLeaderElect        = 301
	EcodeWatcherCleared     = 400
	EcodeEventIndexCleared  = 401
)

var errorMessages = map[int]string{
	EcodeKeyNotFound:        "Key not found",
	EcodeTestFailed:         "Compare failed",
	EcodeNotFile:            "Not a file",
	EcodeNotDir:             "Not a directory",
	EcodeNodeExist:          "Key already exists",
	EcodeRootROnly:          "Root is read only",
	EcodeDirNotEmpty:        "Directory not empty",
	EcodeUnauthorized:       "The request requires user authentication",
	EcodePrevValueRequired:  "PrevValue is Required in POST form",
	EcodeTTLNaN:             "The given TTL in POST form is not a number",
	EcodeIndexNaN:           "The given index in POST form is not a number",
	EcodeInvalidField:       "Invalid field",
	EcodeInvalidForm:        "Invalid POST form",
	EcodeRefreshValue:       "Value provided on refresh",
	EcodeRefreshTTLRequired: "A TTL must be provided on refresh",
	EcodeRaftInternal:       "Raft Internal Error",
	EcodeLeaderElect:        "During Leader Election",
	EcodeWatcherCleared:     "watcher is cleared due to etcd recovery",
	EcodeEventIndexCleared:  "The event in requested index is outdated and cleared",
}

// Error is a v2 API error, serialized exactly as etcd serializes it.
type Error struct {
	ErrorCode int    `json:"errorCode"`
	Message   string `json:"message"`
	Cause     string `json:"cause,omitempty"`
	Index     uint64 `json:"index"`
}

// NewError returns the v2 error with the given code, cause and etcd index.
func NewError(code int, cause string, index uint64) *Error {
	return &Error{ErrorCode: code, Message: errorMessages[code], Cause: cause, Index: index}
}

func (e *Error) Error() string {
	return fmt.Sprintf("%d: %s (%s) [%d]", e.ErrorCode, e.Message, e.Cause, e.Index)
}

// StatusCode is the HTTP status etcd sends with this error (v2error.StatusCode).
func (e *Error) StatusCode() int {
	switch e.ErrorCode {
	case EcodeKeyNotFound:
		return http.StatusNotFound
	case EcodeNotFile, EcodeDirNotEmpty:
		return http.StatusForbidden
	case EcodeTestFailed, EcodeNodeExist:
		return http.StatusPreconditionFailed
	case EcodeUnauthorized:
		return http.StatusUnauthorized
	case EcodeRaftInternal, EcodeLeaderElect:
		return http.StatusInternalServerError
	}
	return http.StatusBadRequest
}
